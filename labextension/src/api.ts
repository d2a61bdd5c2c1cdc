/**
 * REST calls to the Grid Portal server extension under `{base_url}grid/api/`.
 *
 * `ServerConnection.makeRequest` adds the Jupyter token and the XSRF header, so the sidebar
 * authenticates exactly as the rest of JupyterLab does.
 */

import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

import { ICapacity, IGridNode, IJob, IOthers } from './types';

/** A failed call, with a message fit for the sidebar's error banner. */
export class GridApiError extends Error {
  constructor(
    message: string,
    readonly status: number
  ) {
    super(message);
    this.name = 'GridApiError';
  }
}

export function apiUrl(settings: ServerConnection.ISettings, ...path: string[]): string {
  return URLExt.join(settings.baseUrl, 'grid', 'api', ...path.map(encodeURIComponent));
}

/** What to tell the user for an HTTP failure, given the server's own message if any. */
function describeFailure(status: number, serverMessage: string | null, what: string): string {
  if (serverMessage) {
    return serverMessage;
  }
  if (status === 404) {
    return (
      `The Grid Portal server extension did not answer (${what}: 404). ` +
      'Install grid-portal in the environment that runs Jupyter and restart the server.'
    );
  }
  if (status === 503) {
    return 'The grid portal cannot be reached (503). Check that the portal is running.';
  }
  return `${what} failed with HTTP ${status}.`;
}

export async function requestAPI<T>(
  path: string[],
  init: RequestInit = {},
  settings: ServerConnection.ISettings = ServerConnection.makeSettings(),
  query = ''
): Promise<T> {
  const url = apiUrl(settings, ...path) + (query ? `?${query}` : '');
  const what = `${init.method ?? 'GET'} grid/api/${path.join('/')}`;
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, init, settings);
  } catch (error) {
    throw new GridApiError(
      `The Jupyter server cannot be reached (${what}): ${(error as Error).message}`,
      0
    );
  }
  const text = await response.text();
  let data: any = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!response.ok) {
    // The server extension answers errors as `{"message": ..., "reason": ...}`
    // (docs/rest-api.md); `error` is what older servers sent.
    const message =
      data && typeof data.message === 'string' && data.message
        ? data.message
        : data && typeof data.error === 'string'
          ? data.error
          : null;
    throw new GridApiError(describeFailure(response.status, message, what), response.status);
  }
  return data as T;
}

export function getCapacity(settings?: ServerConnection.ISettings): Promise<ICapacity> {
  return requestAPI<ICapacity>(['capacity'], {}, settings);
}

export async function getNodes(settings?: ServerConnection.ISettings): Promise<IGridNode[]> {
  const data = await requestAPI<{ nodes: IGridNode[] }>(['nodes'], {}, settings);
  return data.nodes ?? [];
}

/** One node with `history` filled: the last 10 minutes of telemetry. */
export function getNode(name: string, settings?: ServerConnection.ISettings): Promise<IGridNode> {
  return requestAPI<IGridNode>(['nodes', name], {}, settings);
}

export function getJobs(
  settings?: ServerConnection.ISettings,
  everyone = false
): Promise<{ jobs: IJob[]; others: IOthers }> {
  return requestAPI<{ jobs: IJob[]; others: IOthers }>(
    ['jobs'],
    {},
    settings,
    everyone ? 'everyone=true' : ''
  );
}

/** Who this server is at the portal; `staff` may list everyone's jobs. */
export interface IWhoami {
  user: string;
  role: string;
  staff: boolean;
}

export function getWhoami(settings?: ServerConnection.ISettings): Promise<IWhoami> {
  return requestAPI<IWhoami>(['whoami'], {}, settings);
}

export async function cancelJob(id: string, settings?: ServerConnection.ISettings): Promise<void> {
  await requestAPI<unknown>(['jobs', id], { method: 'DELETE' }, settings);
}
