/**
 * A few lines of DOM building so that the widgets read like their markup. Text always goes
 * in as text nodes: node names, labels and errors come from volunteers' machines and must
 * never be parsed as HTML.
 */

import { clampPercent } from './format';

type Attr = string | number | boolean | null | undefined;
export type Child = Node | string | null | undefined | false;

export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: { [name: string]: Attr } = {},
  ...children: Child[]
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

const SVG_NS = 'http://www.w3.org/2000/svg';

export function svg(tag: string, attrs: { [name: string]: Attr } = {}, ...children: Child[]) {
  const el = document.createElementNS(SVG_NS, tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

function setAttrs(el: Element, attrs: { [name: string]: Attr }): void {
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) {
      continue;
    }
    el.setAttribute(name, value === true ? '' : String(value));
  }
}

function append(el: Element, children: Child[]): void {
  for (const child of children) {
    if (child === null || child === undefined || child === false) {
      continue;
    }
    el.appendChild(typeof child === 'string' ? document.createTextNode(child) : child);
  }
}

/**
 * Set an element's text only when it differs: writing the same text still replaces the text
 * node, and the browser then recomputes style and layout for nothing.
 */
export function setText(el: Element, text: string): void {
  if (el.textContent !== text) {
    el.textContent = text;
  }
}

/** Replace all children of `el`. */
export function replaceChildren(el: Element, ...children: Child[]): void {
  while (el.firstChild) {
    el.removeChild(el.firstChild);
  }
  append(el, children);
}

/**
 * A horizontal bar: `percent` filled, with a text label beside it. `kind` picks the colour
 * (`cpu`, `mem`, `gpu`, `gpumem`) through CSS.
 */
export function bar(kind: string, percent: number, label: string, title?: string): HTMLElement {
  const p = clampPercent(percent);
  return h(
    'div',
    { class: `gp-bar gp-bar-${kind}`, title: title ?? label },
    h(
      'div',
      { class: 'gp-bar-track' },
      h('div', { class: 'gp-bar-fill', style: `width: ${p.toFixed(1)}%` })
    ),
    h('span', { class: 'gp-bar-label' }, label)
  );
}
