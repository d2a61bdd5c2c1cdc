import { LabIcon } from '@jupyterlab/ui-components';

/**
 * A 3x3 grid of cells. `jp-icon3` lets the JupyterLab theme pick the fill, so it works in
 * the light and dark themes alike.
 */
const GRID_SVG = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">
  <g class="jp-icon3" fill="#616161">
    <rect x="2" y="2" width="5.5" height="5.5" rx="1"/>
    <rect x="9.25" y="2" width="5.5" height="5.5" rx="1"/>
    <rect x="16.5" y="2" width="5.5" height="5.5" rx="1"/>
    <rect x="2" y="9.25" width="5.5" height="5.5" rx="1"/>
    <rect x="9.25" y="9.25" width="5.5" height="5.5" rx="1"/>
    <rect x="16.5" y="9.25" width="5.5" height="5.5" rx="1"/>
    <rect x="2" y="16.5" width="5.5" height="5.5" rx="1"/>
    <rect x="9.25" y="16.5" width="5.5" height="5.5" rx="1"/>
    <rect x="16.5" y="16.5" width="5.5" height="5.5" rx="1"/>
  </g>
</svg>`;

export const gridIcon = new LabIcon({ name: 'grid-portal:grid', svgstr: GRID_SVG });
