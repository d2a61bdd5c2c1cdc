/**
 * Status-bar item: "N nodes, M jobs running". A click opens the Grid sidebar.
 */

import { Widget } from '@lumino/widgets';

import { GridConnection } from './connection';
import { plural } from './format';
import { summarize } from './model';

export class GridStatusItem extends Widget {
  constructor(connection: GridConnection, onClick: () => void) {
    super();
    this._connection = connection;
    this.addClass('gp-statusbar');
    this.addClass('jp-StatusBar-TextItem');
    this.node.title = 'Grid Portal: click to open the Grid sidebar';
    this.node.setAttribute('role', 'button');
    this.node.tabIndex = 0;
    this.node.addEventListener('click', onClick);
    this.node.addEventListener('keydown', event => {
      if (event.key === 'Enter' || event.key === ' ') {
        event.preventDefault();
        onClick();
      }
    });
    connection.changed.connect(this._update, this);
    this._update();
  }

  dispose(): void {
    this._connection.changed.disconnect(this._update, this);
    super.dispose();
  }

  private _update(): void {
    const state = this._connection.state;
    let text: string;
    if (state.error) {
      text = 'Grid unreachable';
    } else if (!state.loaded) {
      text = 'Grid…';
    } else {
      const { nodesOnline, jobsRunning } = summarize(state);
      text = `${plural(nodesOnline, 'node')}, ${plural(jobsRunning, 'job')} running`;
    }
    if (this.node.textContent !== text) {
      this.node.textContent = text;
    }
    this.node.dataset.error = state.error ? 'true' : 'false';
  }

  private _connection: GridConnection;
}
