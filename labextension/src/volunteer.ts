/**
 * "This machine": what the volunteer running here gave each portal it serves, as
 * `GET grid/api/volunteer` answers it, in the words `grid-portal volunteer status` prints
 * (`share 2 (67%)`, `lent by home`, `received 3 tasks, 1.2 core-s`). No DOM here.
 */

/** One portal the volunteer serves. */
export interface IMachinePortal {
  portal: string;
  state: string | null;
  share: number | null;
  /** Of the shares of the portals served for themselves; null for a peer lent to. */
  share_percent: number | null;
  lent_by: string | null;
  tasks: number | null;
  core_seconds: number | null;
  running_tasks?: number | null;
  problem?: string | null;
}

/** One volunteer of this server's user on its machine. */
export interface IMachineVolunteer {
  name: string;
  state: string | null;
  reason?: string | null;
  /** Why it could not be asked. */
  problem: string | null;
  portals: IMachinePortal[];
}

export interface IThisMachine {
  running: boolean;
  hint?: string;
  volunteers: IMachineVolunteer[];
}

/** `share 2 (67%)`, or `lent by home` for a peer portal its home portal lends this to. */
export function shareText(p: IMachinePortal): string {
  if (p.lent_by) {
    return `lent by ${p.lent_by}`;
  }
  const share = p.share ?? 0;
  const percent = p.share_percent === null ? '' : ` (${Math.round(p.share_percent)}%)`;
  return `share ${share}${percent}`;
}

/** `received 3 tasks, 1.2 core-s`. */
export function receivedText(p: IMachinePortal): string {
  const tasks = p.tasks ?? 0;
  const seconds = p.core_seconds ?? 0;
  return `received ${tasks} ${tasks === 1 ? 'task' : 'tasks'}, ${seconds.toFixed(1)} core-s`;
}

/** `2 running`, or null with none. */
export function runningText(p: IMachinePortal): string | null {
  return p.running_tasks ? `${p.running_tasks} running` : null;
}

/** `running`, `paused (owner busy)`, or null when the volunteer did not answer. */
export function volunteerStateText(v: IMachineVolunteer): string | null {
  if (!v.state) {
    return null;
  }
  return v.reason ? `${v.state} (${v.reason})` : v.state;
}
