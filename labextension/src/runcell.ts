/**
 * "Run cell on grid": a small dialog (CPUs, GPUs, memory, background), then the active code
 * cell runs as a `%%grid` cell. The magic line is built by ./magic (pure, unit-tested).
 */

import { Dialog, showDialog, showErrorMessage } from '@jupyterlab/apputils';
import { NotebookActions, NotebookPanel } from '@jupyterlab/notebook';
import { Widget } from '@lumino/widgets';

import { h } from './dom';
import { IRawRunOptions, IRunOptions, hasGridMagic, parseRunOptions, withGridMagic } from './magic';

export interface IRunDefaults {
  cpus: number;
  gpus: number;
  memory: string;
  background: boolean;
}

/** The dialog body: four fields, read back by `getValue`. */
class RunOptionsBody extends Widget implements Dialog.IBodyWidget<IRawRunOptions> {
  constructor(defaults: IRunDefaults) {
    super();
    this.addClass('gp-run-dialog');
    const field = (label: string, input: HTMLElement, hint: string) =>
      h('label', { class: 'gp-field' }, h('span', {}, label), input, h('small', {}, hint));
    this._cpus = h('input', {
      class: 'jp-mod-styled gp-run-cpus',
      type: 'number',
      min: 1,
      step: 1,
      value: defaults.cpus
    });
    this._gpus = h('input', {
      class: 'jp-mod-styled gp-run-gpus',
      type: 'number',
      min: 0,
      step: 1,
      value: defaults.gpus
    });
    this._memory = h('input', {
      class: 'jp-mod-styled gp-run-memory',
      type: 'text',
      placeholder: 'e.g. 4GB',
      value: defaults.memory
    });
    this._bg = h('input', { class: 'gp-run-bg', type: 'checkbox', checked: defaults.background });
    this.node.append(
      field('CPUs', this._cpus, 'cores for the cell'),
      field('GPUs', this._gpus, '0 for none'),
      field('Memory', this._memory, 'empty for no requirement'),
      h('label', { class: 'gp-field gp-field-check' }, this._bg, h('span', {}, 'Run in the background'))
    );
  }

  getValue(): IRawRunOptions {
    return {
      cpus: this._cpus.value,
      gpus: this._gpus.value,
      memory: this._memory.value,
      background: this._bg.checked
    };
  }

  private _cpus: HTMLInputElement;
  private _gpus: HTMLInputElement;
  private _memory: HTMLInputElement;
  private _bg: HTMLInputElement;
}

/** Ask for the resources; null if the user cancelled or gave values that do not parse. */
async function askOptions(defaults: IRunDefaults): Promise<IRunOptions | null> {
  const result = await showDialog<IRawRunOptions>({
    title: 'Run cell on grid',
    body: new RunOptionsBody(defaults),
    buttons: [Dialog.cancelButton(), Dialog.okButton({ label: 'Run' })],
    focusNodeSelector: '.gp-run-cpus'
  });
  if (!result.button.accept || !result.value) {
    return null;
  }
  try {
    return parseRunOptions(result.value);
  } catch (error) {
    await showErrorMessage('Run cell on grid', (error as Error).message);
    return null;
  }
}

/**
 * Make sure `%%grid` exists in the kernel: run `%load_ext grid_portal` silently. Loading an
 * extension twice is a no-op in IPython, so this runs every time rather than tracking state
 * that a kernel restart would make stale.
 */
async function ensureMagic(panel: NotebookPanel): Promise<string | null> {
  await panel.sessionContext.ready;
  const kernel = panel.sessionContext.session?.kernel;
  if (!kernel) {
    return 'This notebook has no kernel. Select a Python kernel, then run the cell again.';
  }
  const reply = await kernel.requestExecute({
    code: '%load_ext grid_portal',
    silent: true,
    store_history: false
  }).done;
  const content = reply.content;
  if (content.status === 'error') {
    return (
      `The kernel could not load grid_portal (${content.ename}: ${content.evalue}). ` +
      "Install grid-portal in the kernel's environment (pip install grid-portal) and restart the kernel."
    );
  }
  if (content.status !== 'ok') {
    return `The kernel did not load grid_portal (${content.status}). Run the cell again.`;
  }
  return null;
}

/** The command's body: dialog, magic line, `%load_ext`, run. */
export async function runCellOnGrid(panel: NotebookPanel, defaults: IRunDefaults): Promise<void> {
  const notebook = panel.content;
  const cell = notebook.activeCell;
  if (!cell || cell.model.type !== 'code') {
    await showErrorMessage('Run cell on grid', 'Select a code cell first, then run it on the grid.');
    return;
  }
  const source = cell.model.sharedModel.getSource();
  let options: IRunOptions | null = null;
  if (!hasGridMagic(source)) {
    options = await askOptions(defaults);
    if (!options) {
      return;
    }
  }
  const problem = await ensureMagic(panel);
  if (problem) {
    await showErrorMessage('Run cell on grid', problem);
    return;
  }
  if (options) {
    cell.model.sharedModel.setSource(withGridMagic(source, options));
  }
  // The dialog may have moved the selection: run exactly the cell the command was given.
  const index = notebook.widgets.indexOf(cell);
  if (index < 0) {
    return; // the cell was deleted meanwhile
  }
  notebook.activeCellIndex = index;
  notebook.deselectAll();
  await NotebookActions.run(notebook, panel.sessionContext);
}
