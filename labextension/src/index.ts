/**
 * Grid Portal for JupyterLab 4 and Notebook 7: the Grid sidebar, the "Run cell on grid"
 * command (palette and notebook toolbar) and a status-bar item, all fed by one live
 * connection to `{base_url}grid/api/`.
 *
 * Only `JupyterFrontEnd.IShell` methods are used (`add`, `activateById`), which both the
 * JupyterLab and the Notebook 7 shells have; every other service is optional, so the plugin
 * loads wherever its shell allows and leaves out what is missing (Notebook 7 has no status
 * bar, for one).
 */

import {
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';
import { INotebookTracker } from '@jupyterlab/notebook';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { IStatusBar } from '@jupyterlab/statusbar';

import { GridConnection } from './connection';
import { gridIcon } from './icon';
import { IRunDefaults, runCellOnGrid } from './runcell';
import { GridSidebar, SIDEBAR_ID } from './sidebar';
import { GridStatusItem } from './statusbar';
import { ALL_COLUMNS } from './views';

/** The plugin id; `schema/plugin.json` holds its settings. */
const PLUGIN_ID = 'grid-portal:plugin';

export namespace CommandIDs {
  export const runCell = 'grid-portal:run-cell';
  export const openSidebar = 'grid-portal:open-sidebar';
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description: 'Grid Portal: live grid capacity, nodes and jobs, and Run cell on grid.',
  autoStart: true,
  optional: [ISettingRegistry, ICommandPalette, INotebookTracker, IStatusBar, ILayoutRestorer],
  activate: (
    app: JupyterFrontEnd,
    settingRegistry: ISettingRegistry | null,
    palette: ICommandPalette | null,
    tracker: INotebookTracker | null,
    statusBar: IStatusBar | null,
    restorer: ILayoutRestorer | null
  ) => {
    const connection = new GridConnection();
    const sidebar = new GridSidebar(connection);
    app.shell.add(sidebar, 'left', { rank: 850 });
    restorer?.add(sidebar, SIDEBAR_ID);
    connection.start();

    const defaults: IRunDefaults = { cpus: 1, gpus: 0, memory: '', background: false };

    app.commands.addCommand(CommandIDs.openSidebar, {
      label: 'Show Grid Sidebar',
      icon: gridIcon,
      execute: () => app.shell.activateById(SIDEBAR_ID)
    });

    app.commands.addCommand(CommandIDs.runCell, {
      // In the notebook toolbar the icon stands alone; the caption is its tooltip.
      label: args => (args.toolbar ? '' : 'Run Cell on Grid'),
      caption: 'Run the active cell on the grid as a %%grid cell',
      icon: gridIcon,
      isEnabled: () =>
        !!tracker?.currentWidget &&
        tracker.currentWidget === app.shell.currentWidget &&
        tracker.currentWidget.content.activeCell?.model.type === 'code',
      execute: async () => {
        const panel = tracker?.currentWidget;
        if (panel) {
          await runCellOnGrid(panel, defaults);
        }
      }
    });
    if (tracker) {
      // Keep the toolbar button's enabled state in step with the active cell.
      const refresh = () => app.commands.notifyCommandChanged(CommandIDs.runCell);
      tracker.currentChanged.connect(refresh);
      tracker.activeCellChanged.connect(refresh);
    }

    if (palette) {
      palette.addItem({ command: CommandIDs.runCell, category: 'Grid' });
      palette.addItem({ command: CommandIDs.openSidebar, category: 'Grid' });
    }

    if (statusBar) {
      statusBar.registerStatusItem('grid-portal:status', {
        item: new GridStatusItem(connection, () => app.shell.activateById(SIDEBAR_ID)),
        align: 'left',
        rank: 100
      });
    }

    if (settingRegistry) {
      const apply = (settings: ISettingRegistry.ISettings) => {
        const get = <T>(key: string, fallback: T): T =>
          (settings.get(key).composite as T | undefined) ?? fallback;
        defaults.cpus = get('defaultCpus', 1);
        defaults.gpus = get('defaultGpus', 0);
        defaults.memory = get('defaultMemory', '');
        defaults.background = get('defaultBackground', false);
        sidebar.setColumns(get<string[]>('columns', [...ALL_COLUMNS]));
      };
      settingRegistry
        .load(PLUGIN_ID)
        .then(settings => {
          apply(settings);
          settings.changed.connect(apply);
        })
        .catch(reason => {
          console.error('grid-portal: could not load settings', reason);
        });
    }
  }
};

export default plugin;
