// The DDP web console (PROTOCOL.md §13). Plain ES module, no framework, no build step: the
// server serves this file, console.css, index.html and the project's JavaScript client
// (./ddp.js) from inside its binary. Everything here goes through the public API with the key
// the user signed in with; the key lives in sessionStorage (this browser tab only).
//
// Views are chosen by the location hash (#/homes/1/devices/2). Each view registers what it
// must stop when it is left (sockets, timers) with `onLeave`.

import { Client, DdpError, isValidKey, parseEtag, scopePath } from './ddp.js';

const TOKEN_KEY = 'ddp.console.key';
const MAX_DEPTH = 32;
const MAX_VALUE_BYTES = 64 * 1024;
const MAX_EVENTS = 200;
const DEVICE_POLL_MS = 5000;
const LIST_POLL_MS = 10000;
const JOB_POLL_MS = 1500;

const session = {
  /** @type {Client|null} */
  client: null,
  /** @type {'admin'|'project'|null} */
  role: null,
  /** @type {Map<number, object>} homes by id, as last listed */
  homes: new Map(),
};

let leaving = [];
let firstRender = true;

// ---------------------------------------------------------------------------------------------
// Small DOM helpers. Text always goes in as text (never as HTML).

/**
 * Creates an element. `props`: `class`, `text`, `on<Event>` handlers, `dataset`, boolean
 * attributes as booleans, anything else as an attribute.
 */
function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k === 'text') el.textContent = v;
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2).toLowerCase(), v);
    else if (v === true) el.setAttribute(k, '');
    else el.setAttribute(k, String(v));
  }
  append(el, children);
  return el;
}

function append(el, ...children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

let uid = 0;
function nextId(prefix) {
  uid += 1;
  return `${prefix}-${uid}`;
}

/** A labelled field: returns `{wrap, input}`. `kind`: 'input' | 'textarea' | 'select'. */
function field(label, { kind = 'input', hint, options, ...attrs } = {}) {
  const id = attrs.id || nextId('f');
  let input;
  if (kind === 'textarea') input = h('textarea', { id, spellcheck: 'false', ...attrs });
  else if (kind === 'select') {
    input = h('select', { id, ...attrs }, (options || []).map(([value, text]) => h('option', { value, text })));
  } else input = h('input', { id, type: 'text', autocomplete: 'off', spellcheck: 'false', ...attrs });
  const hintEl = hint ? h('small', { class: 'hint', id: `${id}-hint`, text: hint }) : null;
  if (hintEl) input.setAttribute('aria-describedby', hintEl.id);
  const wrap = h('div', { class: 'field' }, h('label', { for: id, text: label }), input, hintEl);
  return { wrap, input };
}

function checkbox(label, attrs = {}) {
  const id = attrs.id || nextId('c');
  const input = h('input', { type: 'checkbox', id, ...attrs });
  return { wrap: h('div', { class: 'check' }, input, h('label', { for: id, text: label })), input };
}

function button(text, props = {}) {
  return h('button', { type: 'button', ...props }, text);
}

/** Ctrl/Cmd+Enter in a textarea submits its form (Enter alone adds a line). */
function submitOnCtrlEnter(textarea) {
  textarea.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey) && textarea.form) {
      e.preventDefault();
      textarea.form.requestSubmit();
    }
  });
}

function fmtTime(t) {
  if (!t) return '—';
  const d = new Date(t);
  if (Number.isNaN(d.getTime())) return String(t);
  return d.toLocaleString();
}

function timeEl(t) {
  return t ? h('time', { datetime: t, title: t, text: fmtTime(t) }) : h('span', { class: 'muted', text: '—' });
}

function compactJson(value, max = 400) {
  const s = JSON.stringify(value);
  if (s === undefined) return '';
  return s.length > max ? `${s.slice(0, max)}…` : s;
}

function prettyJson(value) {
  return JSON.stringify(value, null, 2);
}

// ---------------------------------------------------------------------------------------------
// Errors and notices: every failure is shown in words.

/** A server (or client) error in words: reason, status, message. */
function describe(err) {
  if (err instanceof DdpError) {
    if (err.reason === 'NETWORK_ERROR') return `Cannot reach the server (NETWORK_ERROR): ${err.message}`;
    const status = err.status ? ` (${err.status})` : '';
    let text = `${err.reason}${status}: ${err.message}`;
    if (err.retryAfter !== undefined) text += ` — retry after ${err.retryAfter} s`;
    return text;
  }
  if (err instanceof Error) return `${err.name}: ${err.message}`;
  return String(err);
}

/** A message area for one part of a page: `show(err|text)`, `ok(text)`, `clear()`. */
function messages() {
  const el = h('div', { class: 'messages', 'aria-live': 'polite' });
  return {
    el,
    clear() {
      clear(el);
    },
    show(err, prefix) {
      clear(el);
      const text = typeof err === 'string' ? err : describe(err);
      el.append(h('p', { class: 'alert error', role: 'alert' }, prefix ? h('strong', { text: `${prefix} ` }) : null, text));
    },
    ok(text) {
      clear(el);
      el.append(h('p', { class: 'alert ok', role: 'status', text }));
    },
    info(node) {
      clear(el);
      el.append(node);
    },
  };
}

/**
 * Runs `fn` for a form or button: disables `control` meanwhile, shows any error in `msg`.
 * Returns fn's result, or undefined when it failed.
 */
async function act(control, msg, fn) {
  if (control) control.disabled = true;
  if (msg) msg.clear();
  try {
    return await fn();
  } catch (err) {
    if (msg) msg.show(err);
    else showBanner(err);
    return undefined;
  } finally {
    if (control) control.disabled = false;
  }
}

function showBanner(err) {
  const main = document.getElementById('main');
  const p = h('p', { class: 'alert error banner', role: 'alert', text: describe(err) });
  main.prepend(p);
}

window.addEventListener('unhandledrejection', (e) => showBanner(e.reason));

// ---------------------------------------------------------------------------------------------
// Validation done in the page, before any request (PROTOCOL.md §3).

/** Why `key` is not a key, or null. */
function keyProblem(key) {
  if (key.length === 0) return 'A key must not be empty.';
  if (!isValidKey(key)) {
    if (key.length > 255) return `A key is at most 255 characters long (this one has ${key.length}).`;
    const bad = [...key].find((c) => !/[A-Za-z0-9_\-:.]/.test(c));
    return `A key may hold only letters A–Z and a–z, digits and _ - : . (not ${JSON.stringify(bad)}).`;
  }
  return null;
}

function depthOf(v) {
  if (Array.isArray(v)) return 1 + v.reduce((m, x) => Math.max(m, depthOf(x)), 0);
  if (v && typeof v === 'object') return 1 + Object.values(v).reduce((m, x) => Math.max(m, depthOf(x)), 0);
  return 0;
}

/** Parses JSON text typed by the user: `{value}` or `{problem}`. */
function parseJsonText(text, what = 'The value') {
  if (text.trim() === '') return { problem: `${what} is empty: type a JSON value, e.g. 21.5, "eco", true or {"a": 1}.` };
  let value;
  try {
    value = JSON.parse(text);
  } catch (e) {
    return { problem: `${what} is not valid JSON: ${e.message}. Strings need double quotes, e.g. "eco".` };
  }
  return { value };
}

/** Checks a value for a key: `{value}` or `{problem}`. */
function valueProblem(text) {
  const r = parseJsonText(text);
  if (r.problem) return r;
  if (r.value === null) return { problem: 'A value cannot be null; delete the key instead.' };
  if (depthOf(r.value) > MAX_DEPTH) return { problem: `The value nests deeper than ${MAX_DEPTH} levels.` };
  const size = new TextEncoder().encode(JSON.stringify(r.value)).length;
  if (size > MAX_VALUE_BYTES) return { problem: `The value is ${size} bytes; the limit is ${MAX_VALUE_BYTES}.` };
  return r;
}

function patchProblem(text) {
  const r = parseJsonText(text, 'The merge patch');
  if (r.problem) return r;
  if (!r.value || typeof r.value !== 'object' || Array.isArray(r.value)) {
    return { problem: 'A merge patch is a JSON object, e.g. {"mode": "eco", "old": null} (null removes a member).' };
  }
  if (depthOf(r.value) > MAX_DEPTH) return { problem: `The patch nests deeper than ${MAX_DEPTH} levels.` };
  return r;
}

/** Validates a job's ops (PROTOCOL.md §11): `{value}` or `{problem}`. */
function opsProblem(text) {
  const r = parseJsonText(text, 'The ops');
  if (r.problem) return r;
  const ops = r.value;
  if (!Array.isArray(ops) || ops.length === 0) return { problem: 'The ops are a JSON array of at least one op.' };
  for (const [i, op] of ops.entries()) {
    const where = `op ${i}:`;
    if (!op || typeof op !== 'object' || Array.isArray(op)) return { problem: `${where} an op is an object.` };
    if (!['set', 'delete', 'merge'].includes(op.op)) return { problem: `${where} "op" is "set", "delete" or "merge".` };
    if (typeof op.key !== 'string') return { problem: `${where} "key" is a string.` };
    const kp = keyProblem(op.key);
    if (kp) return { problem: `${where} ${kp}` };
    if (op.op !== 'delete' && (op.value === undefined || op.value === null)) {
      return { problem: `${where} a ${op.op} needs a "value" that is not null.` };
    }
    if (op.op === 'merge' && (typeof op.value !== 'object' || Array.isArray(op.value))) {
      return { problem: `${where} a merge's "value" is a JSON object.` };
    }
    if (op.ifRev !== undefined && !(Number.isInteger(op.ifRev) && op.ifRev >= 0)) {
      return { problem: `${where} "ifRev" is a whole number, 0 or more.` };
    }
  }
  return r;
}

// ---------------------------------------------------------------------------------------------
// Writes that keep the user's JSON text exactly as typed (numbers such as 12345678901234567890
// or 1.10 keep their text, PROTOCOL.md §3): the text is validated above, then sent as the body
// through the client's request().

function ifMatchHeaders(ifMatch, ifNoneMatch) {
  const headers = {};
  if (ifMatch !== undefined && ifMatch !== null) headers['If-Match'] = `"${ifMatch}"`;
  if (ifNoneMatch) headers['If-None-Match'] = '*';
  return headers;
}

async function putText(scope, key, text, { ifMatch, ifNoneMatch } = {}) {
  const r = await session.client.request('PUT', `${scopePath(scope)}/kv/${encodeURIComponent(key)}`, {
    body: `{"value":${text.trim()}}`,
    headers: ifMatchHeaders(ifMatch, ifNoneMatch),
  });
  return parseEtag(r.headers.get('etag'));
}

async function mergeText(scope, key, text, { ifMatch } = {}) {
  const r = await session.client.request('PATCH', `${scopePath(scope)}/kv/${encodeURIComponent(key)}`, {
    body: text.trim(),
    headers: { 'Content-Type': 'application/merge-patch+json', ...ifMatchHeaders(ifMatch) },
  });
  return parseEtag(r.headers.get('etag'));
}

// ---------------------------------------------------------------------------------------------
// Sockets end with the view that opened them (the client closes one still connecting once it
// opens, so the browser logs nothing).

function closeStream(stream) {
  if (stream) stream.close();
}

function closeMirror(mirror) {
  if (mirror) mirror.close();
}

// ---------------------------------------------------------------------------------------------
// Sign in and out.

function setSignedIn(signedIn) {
  document.getElementById('nav').hidden = !signedIn;
  document.getElementById('who').hidden = !signedIn;
  if (signedIn) {
    document.getElementById('who-role').textContent = session.role === 'admin' ? 'Admin key' : 'Project key';
    for (const a of document.querySelectorAll('[data-admin]')) a.hidden = session.role !== 'admin';
  }
}

/** Checks a key against the server; sets up the session or throws. */
async function signIn(token) {
  token = token.trim();
  if (token.startsWith('ddpd_')) {
    throw new Error('This is a device key. The console signs in with the admin key or a project key.');
  }
  const client = new Client({ token });
  try {
    const homes = await client.listHomes();
    session.homes = new Map(homes.map((x) => [x.id, x]));
  } catch (err) {
    if (err instanceof DdpError && err.status === 401) {
      throw new DdpError(`the server does not know this key (${err.message})`, { status: 401, reason: err.reason });
    }
    if (err instanceof DdpError && err.status === 403) {
      throw new DdpError(`this key may not use the console; sign in with the admin key or a project key (${err.message})`, {
        status: 403,
        reason: err.reason,
      });
    }
    throw err;
  }
  let role = 'project';
  if (!token.startsWith('ddpp_')) {
    // Only the admin may list project keys; a project key is refused with 403.
    try {
      await client.listApiKeys();
      role = 'admin';
    } catch (err) {
      if (!(err instanceof DdpError && err.status === 403)) throw err;
    }
  }
  session.client = client;
  session.role = role;
  sessionStorage.setItem(TOKEN_KEY, token);
  setSignedIn(true);
}

function signOut() {
  runLeave();
  sessionStorage.removeItem(TOKEN_KEY);
  session.client = null;
  session.role = null;
  session.homes = new Map();
  setSignedIn(false);
  if (location.hash && location.hash !== '#/') location.hash = '#/';
  else route();
}

function viewSignIn(main, notice) {
  const msg = messages();
  const token = field('API key', {
    type: 'password',
    name: 'key',
    id: 'sign-in-key',
    autocomplete: 'off',
    required: true,
    hint: 'The admin key or a project key. It is kept for this browser tab only, until you sign out or close the tab.',
  });
  const submit = h('button', { type: 'submit', text: 'Sign in' });
  const form = h(
    'form',
    {
      class: 'card narrow',
      'aria-labelledby': 'sign-in-title',
      onSubmit: async (e) => {
        e.preventDefault();
        const ok = await act(submit, msg, () => signIn(token.input.value).then(() => true));
        if (ok) {
          if (!location.hash || location.hash === '#/' || location.hash === '#') location.hash = '#/homes';
          else route();
        }
      },
    },
    h('h1', { id: 'sign-in-title', tabindex: '-1', text: 'Sign in' }),
    h('p', { class: 'muted', text: 'Manage the homes, devices, keys and jobs of this Device Data Proxy.' }),
    token.wrap,
    msg.el,
    h('div', { class: 'actions' }, submit),
  );
  main.append(form);
  if (notice) msg.show(notice);
  token.input.focus();
}

// ---------------------------------------------------------------------------------------------
// Routing.

function onLeave(fn) {
  leaving.push(fn);
}

function runLeave() {
  const fns = leaving;
  leaving = [];
  for (const fn of fns) {
    try {
      fn();
    } catch (err) {
      showBanner(err);
    }
  }
}

/** Calls `fn` every `ms` while the view stays, and once more whenever `kick()` is called. */
function every(ms, fn) {
  let timer = null;
  let stopped = false;
  const tick = async () => {
    timer = null;
    if (stopped) return;
    await fn();
    if (!stopped && timer === null) timer = setTimeout(tick, ms);
  };
  timer = setTimeout(tick, ms);
  onLeave(() => {
    stopped = true;
    if (timer) clearTimeout(timer);
  });
  let kickTimer = null;
  return {
    kick() {
      if (stopped || kickTimer) return;
      kickTimer = setTimeout(() => {
        kickTimer = null;
        if (timer) clearTimeout(timer);
        tick();
      }, 250);
    },
  };
}

function route() {
  runLeave();
  const main = document.getElementById('main');
  clear(main);
  const path = location.hash.replace(/^#/, '').split('?')[0];
  const parts = path.split('/').filter(Boolean);
  for (const a of document.querySelectorAll('#nav a')) a.removeAttribute('aria-current');
  if (!session.client) {
    viewSignIn(main);
    firstRender = false;
    return;
  }
  const isId = (x) => /^[1-9][0-9]{0,19}$/.test(x);
  const navTo = (name) => {
    const a = document.querySelector(`#nav a[data-nav="${name}"]`);
    if (a) a.setAttribute('aria-current', 'page');
  };
  let view;
  if (parts.length === 0 || (parts[0] === 'homes' && parts.length === 1)) {
    navTo('homes');
    view = () => viewHomes(main);
  } else if (parts[0] === 'homes' && parts.length === 2 && isId(parts[1])) {
    navTo('homes');
    view = () => viewHome(main, Number(parts[1]));
  } else if (parts[0] === 'homes' && parts.length === 4 && isId(parts[1]) && parts[2] === 'devices' && isId(parts[3])) {
    navTo('homes');
    view = () => viewDevice(main, Number(parts[3]), Number(parts[1]));
  } else if (parts[0] === 'devices' && parts.length === 1) {
    navTo('devices');
    view = () => viewDevices(main);
  } else if (parts[0] === 'devices' && parts.length === 2 && isId(parts[1])) {
    navTo('devices');
    view = () => viewDevice(main, Number(parts[1]), null);
  } else if (parts[0] === 'jobs' && parts.length === 1) {
    navTo('jobs');
    view = () => viewJobs(main);
  } else if (parts[0] === 'jobs' && parts.length === 2 && isId(parts[1])) {
    navTo('jobs');
    view = () => viewJob(main, Number(parts[1]));
  } else if (parts[0] === 'keys' && parts.length === 1) {
    navTo('keys');
    view = () => viewApiKeys(main);
  } else {
    view = () => {
      main.append(pageTitle('Not found'), h('p', {}, 'No such page. ', h('a', { href: '#/homes', text: 'Go to the homes' }), '.'));
    };
  }
  view();
  if (!firstRender) {
    const title = main.querySelector('h1');
    if (title) title.focus({ preventScroll: false });
  }
  firstRender = false;
}

function pageTitle(text, crumbs = []) {
  const nodes = [];
  if (crumbs.length) {
    nodes.push(
      h(
        'nav',
        { class: 'crumbs', 'aria-label': 'Breadcrumb' },
        h('ol', {}, crumbs.map(([label, href]) => h('li', {}, href ? h('a', { href, text: label }) : h('span', { text: label })))),
      ),
    );
  }
  nodes.push(h('h1', { tabindex: '-1', text }));
  return append(document.createDocumentFragment(), nodes);
}

function section(title, ...children) {
  const id = nextId('s');
  return h('section', { class: 'card', 'aria-labelledby': id }, h('h2', { id, text: title }), children);
}

/** A "shown once" box for a new secret, with a copy button. */
function secretBox(title, secret, what) {
  const id = nextId('secret');
  const input = h('input', { id, type: 'text', readonly: true, value: secret, class: 'secret', spellcheck: 'false', 'aria-describedby': `${id}-note` });
  input.addEventListener('focus', () => input.select());
  const status = h('span', { class: 'copy-status', role: 'status' });
  const copy = button('Copy', {
    class: 'secondary',
    onClick: async () => {
      try {
        await navigator.clipboard.writeText(secret);
        status.textContent = 'Copied to the clipboard.';
      } catch {
        input.focus();
        input.select();
        status.textContent = 'The browser did not allow copying: the key is selected, copy it with Ctrl+C.';
      }
    },
  });
  return h(
    'div',
    { class: 'secret-box', role: 'region', 'aria-label': title },
    h('h3', { text: title }),
    h('p', { id: `${id}-note`, class: 'once' }, h('strong', { text: 'Shown once. ' }), `Copy ${what} now: the server keeps only a hash of it and cannot show it again.`),
    h('div', { class: 'secret-row' }, h('label', { for: id, class: 'sr-only', text: title }), input, copy),
    status,
  );
}

/** A button that asks for confirmation in place before running `fn`. */
function confirmButton(text, confirmText, fn, props = {}) {
  const wrap = h('span', { class: 'confirm' });
  const start = button(text, { class: 'danger small', ...props });
  const render = (asking) => {
    clear(wrap);
    if (!asking) {
      wrap.append(start);
      return;
    }
    const yes = button(confirmText, { class: 'danger small' });
    const no = button('Cancel', { class: 'secondary small' });
    yes.addEventListener('click', async () => {
      yes.disabled = true;
      no.disabled = true;
      try {
        await fn();
      } finally {
        if (wrap.isConnected) render(false);
      }
    });
    no.addEventListener('click', () => {
      render(false);
      start.focus();
    });
    wrap.append(yes, ' ', no);
    yes.focus();
  };
  start.addEventListener('click', () => render(true));
  render(false);
  return wrap;
}

// ---------------------------------------------------------------------------------------------
// Homes.

async function loadHomes() {
  const homes = await session.client.listHomes();
  session.homes = new Map(homes.map((x) => [x.id, x]));
  return homes;
}

/** A home by id: from the list (project keys may list homes but not read one by id). */
async function homeById(id) {
  if (session.role === 'admin') {
    const home = await session.client.getHome(id);
    session.homes.set(home.id, home);
    return home;
  }
  if (!session.homes.has(id)) await loadHomes();
  const home = session.homes.get(id);
  if (!home) throw new DdpError(`home ${id} is not one of the homes this key sees`, { reason: 'HOME_NOT_FOUND', status: 404 });
  return home;
}

function viewHomes(main) {
  const msg = messages();
  const tbody = h('tbody');
  const table = h(
    'table',
    { class: 'list' },
    h('caption', { class: 'sr-only', text: 'Homes' }),
    h('thead', {}, h('tr', {}, h('th', { scope: 'col', text: 'Home' }), h('th', { scope: 'col', text: 'Id' }), h('th', { scope: 'col', text: 'Created' }), session.role === 'admin' ? h('th', { scope: 'col', text: 'Actions' }) : null)),
    tbody,
  );
  const empty = h('p', { class: 'muted', hidden: true, text: 'No homes yet.' });
  const render = (homes) => {
    clear(tbody);
    empty.hidden = homes.length > 0;
    for (const home of homes) {
      tbody.append(
        h(
          'tr',
          {},
          h('td', { 'data-label': 'Home' }, h('a', { href: `#/homes/${home.id}`, text: home.name })),
          h('td', { 'data-label': 'Id', class: 'num', text: home.id }),
          h('td', { 'data-label': 'Created' }, timeEl(home.creationTime)),
          session.role === 'admin'
            ? h(
                'td',
                { 'data-label': 'Actions' },
                confirmButton('Delete', `Delete “${home.name}”`, () =>
                  act(null, msg, async () => {
                    await session.client.deleteHome(home.id);
                    msg.ok(`Home “${home.name}” deleted; its devices are in no home now.`);
                    render(await loadHomes());
                  }),
                ),
              )
            : null,
        ),
      );
    }
  };
  main.append(pageTitle('Homes'));
  main.append(section('Homes', msg.el, h('div', { class: 'table-wrap' }, table), empty));
  if (session.role === 'admin') {
    const fmsg = messages();
    const name = field('Name', { required: true, maxlength: '255', placeholder: 'e.g. Flat 4B' });
    const submit = h('button', { type: 'submit', text: 'Create home' });
    main.append(
      section(
        'New home',
        h(
          'form',
          {
            class: 'inline-form',
            onSubmit: (e) => {
              e.preventDefault();
              if (!name.input.value.trim()) return fmsg.show('A home needs a name.');
              act(submit, fmsg, async () => {
                const home = await session.client.createHome({ name: name.input.value.trim() });
                fmsg.ok(`Home “${home.name}” created (id ${home.id}).`);
                name.input.value = '';
                render(await loadHomes());
              });
            },
          },
          name.wrap,
          h('div', { class: 'actions' }, submit),
        ),
        fmsg.el,
      ),
    );
  }
  act(null, msg, async () => render(await loadHomes()));
}

// ---------------------------------------------------------------------------------------------
// Devices: tables, statuses.

function connectionBadge(device) {
  const connected = device.isConnected ?? (device.sync && device.sync.isConnected);
  if (connected) {
    return h('span', { class: 'badge good', title: device.lastConnectTime ? `connected since ${device.lastConnectTime}` : '' }, 'Connected');
  }
  return h('span', { class: 'badge muted', title: device.lastDisconnectTime ? `last seen ${device.lastDisconnectTime}` : 'never connected' }, 'Offline');
}

/** Where a device's sync stands, in words and a badge. */
function syncSummary(sync) {
  if (!sync) return h('span', { class: 'muted', text: '—' });
  const { rev, deliveredRev, appliedRev } = sync;
  let badge;
  if (appliedRev >= rev) badge = h('span', { class: 'badge good', text: 'In sync' });
  else if (deliveredRev >= rev) badge = h('span', { class: 'badge warn', title: 'the device has every change but has not acknowledged all of them', text: 'Delivered' });
  else badge = h('span', { class: 'badge bad', text: `Behind by ${rev - Math.max(deliveredRev, appliedRev)}` });
  return h('span', { class: 'sync' }, badge, ' ', h('span', { class: 'muted small-text', text: `rev ${rev} · delivered ${deliveredRev} · applied ${appliedRev}` }));
}

function deviceHref(d) {
  return d.homeId ? `#/homes/${d.homeId}/devices/${d.id}` : `#/devices/${d.id}`;
}

/** A table of devices; `fetchPage(after)` answers `{devices, next}`. */
function deviceList(msg, fetchPage, { showHome = false } = {}) {
  const tbody = h('tbody');
  const empty = h('p', { class: 'muted', hidden: true, text: 'No devices.' });
  const more = button('Show more', { class: 'secondary', hidden: true });
  let shown = [];
  let next = null;
  const head = ['Device', 'Class / tag', 'Connection', 'Sync'];
  if (showHome) head.splice(1, 0, 'Home');
  const table = h(
    'table',
    { class: 'list devices' },
    h('caption', { class: 'sr-only', text: 'Devices' }),
    h('thead', {}, h('tr', {}, head.map((t) => h('th', { scope: 'col', text: t })))),
    tbody,
  );
  const row = (d) =>
    h(
      'tr',
      { dataset: { device: d.id } },
      h('td', { 'data-label': 'Device' }, h('a', { href: deviceHref(d), text: d.name }), h('span', { class: 'muted small-text', text: ` #${d.id}` })),
      showHome
        ? h('td', { 'data-label': 'Home' }, d.homeId ? h('a', { href: `#/homes/${d.homeId}`, text: (session.homes.get(d.homeId) || {}).name || `#${d.homeId}` }) : h('span', { class: 'muted', text: 'none' }))
        : null,
      h('td', { 'data-label': 'Class / tag', text: [d.deviceClass, d.tag].filter(Boolean).join(' / ') || '—' }),
      h('td', { 'data-label': 'Connection' }, connectionBadge(d)),
      h('td', { 'data-label': 'Sync' }, syncSummary(d.sync)),
    );
  const render = () => {
    clear(tbody);
    for (const d of shown) tbody.append(row(d));
    empty.hidden = shown.length > 0;
    more.hidden = !next;
  };
  /** Reloads every page shown so far (for live status). */
  const refresh = async () => {
    const pages = Math.max(1, Math.ceil(shown.length / 100));
    let all = [];
    let after;
    let n = null;
    for (let i = 0; i < pages; i++) {
      const page = await fetchPage(after);
      all = all.concat(page.devices);
      n = page.next;
      if (!n) break;
      after = n;
    }
    shown = all;
    next = n;
    render();
  };
  more.addEventListener('click', () =>
    act(more, msg, async () => {
      const page = await fetchPage(next);
      shown = shown.concat(page.devices);
      next = page.next;
      render();
    }),
  );
  return { el: h('div', {}, h('div', { class: 'table-wrap' }, table), empty, h('div', { class: 'actions' }, more)), refresh };
}

function createDeviceForm(homeId, onCreated) {
  const msg = messages();
  const name = field('Name', { required: true, maxlength: '255', placeholder: 'e.g. Hall thermostat' });
  const cls = field('Device class (optional)', { maxlength: '255', placeholder: 'e.g. thermostat' });
  const tag = field('Tag (optional)', { maxlength: '255' });
  const submit = h('button', { type: 'submit', text: 'Create device' });
  const result = h('div');
  const form = h(
    'form',
    {
      class: 'grid-form',
      onSubmit: (e) => {
        e.preventDefault();
        clear(result);
        if (!name.input.value.trim()) return msg.show('A device needs a name.');
        const body = { name: name.input.value.trim() };
        if (homeId) body.homeId = homeId;
        if (cls.input.value.trim()) body.deviceClass = cls.input.value.trim();
        if (tag.input.value.trim()) body.tag = tag.input.value.trim();
        act(submit, msg, async () => {
          const d = await session.client.createDevice(body);
          msg.ok(`Device “${d.name}” created (id ${d.id}).`);
          result.append(secretBox(`API key of device “${d.name}”`, d.apiKey, 'this device key'));
          form.reset();
          onCreated(d);
        });
      },
    },
    name.wrap,
    cls.wrap,
    tag.wrap,
    h('div', { class: 'actions' }, submit),
  );
  return section('New device', form, msg.el, result);
}

function viewDevices(main) {
  const msg = messages();
  const where = field('Where (one condition a line)', {
    kind: 'textarea',
    rows: '2',
    placeholder: 'fw<2.1\nmode="eco"',
    hint: 'Conditions such as fw<2.1, mode="eco", fw (the key exists), !fw (absent). Values are JSON literals.',
  });
  const cls = field('Device class', {});
  const tag = field('Tag', {});
  const connected = field('Connection', { kind: 'select', options: [['', 'Any'], ['true', 'Connected'], ['false', 'Offline']] });
  const behind = field('Sync', { kind: 'select', options: [['', 'Any'], ['true', 'Behind'], ['false', 'Not behind']] });
  submitOnCtrlEnter(where.input);
  let filters = {};
  const list = deviceList(msg, (after) => session.client.listDevices({ ...filters, limit: 100, after }), { showHome: true });
  const submit = h('button', { type: 'submit', text: 'Find devices' });
  const form = h(
    'form',
    {
      class: 'grid-form',
      onSubmit: (e) => {
        e.preventDefault();
        filters = {};
        const w = where.input.value.split('\n').map((x) => x.trim()).filter(Boolean);
        if (w.length) filters.where = w;
        if (cls.input.value.trim()) filters.class = cls.input.value.trim();
        if (tag.input.value.trim()) filters.tag = tag.input.value.trim();
        if (connected.input.value) filters.connected = connected.input.value === 'true';
        if (behind.input.value) filters.behind = behind.input.value === 'true';
        act(submit, msg, () => list.refresh());
      },
    },
    where.wrap,
    cls.wrap,
    tag.wrap,
    connected.wrap,
    behind.wrap,
    h('div', { class: 'actions' }, submit),
  );
  main.append(pageTitle('Devices'));
  main.append(section('Find devices', form));
  main.append(section('Devices', msg.el, list.el));
  if (session.role === 'admin') main.append(createDeviceForm(null, () => list.refresh()));
  act(null, msg, async () => {
    if (session.homes.size === 0) await loadHomes();
    await list.refresh();
  });
  const poll = every(LIST_POLL_MS, () => act(null, msg, () => list.refresh()));
  void poll;
}

// ---------------------------------------------------------------------------------------------
// A home: its devices, live; its events, live.

function eventItem(ev) {
  const origin = ev.originDeviceId ? `device #${ev.originDeviceId}` : ev.originProjectKeyId ? `project key #${ev.originProjectKeyId}` : '';
  return h(
    'li',
    { class: 'event' },
    h('div', { class: 'event-head' }, h('code', { class: 'event-type', text: ev.eventType }), ' ', timeEl(ev.timestamp), origin ? h('span', { class: 'muted small-text', text: ` · ${origin}` }) : null),
    ev.eventData !== undefined ? h('pre', { class: 'value', text: compactJson(ev.eventData, 1000) }) : null,
  );
}

/** A live event list for `homeId`; calls `onEvent(ev)` for each. */
function eventsPanel(homeId, onEvent) {
  const msg = messages();
  const status = h('span', { class: 'badge muted', role: 'status', id: 'events-status', text: 'Connecting' });
  const list = h('ol', { class: 'events', reversed: true, 'aria-live': 'off' });
  const empty = h('p', { class: 'muted', text: 'No events since this page opened.' });
  const clearBtn = button('Clear', { class: 'secondary small', onClick: () => { clear(list); empty.hidden = false; } });
  let stream = null;
  let stopped = false;
  let delay = 1000;
  let retry = null;
  const open = () => {
    if (stopped) return;
    status.textContent = 'Connecting';
    status.className = 'badge muted';
    let s;
    try {
      s = session.client.events({
        home: homeId,
        onOpen: () => {
          delay = 1000;
          msg.clear();
          status.textContent = 'Live';
          status.className = 'badge good';
        },
        onEvent: (ev) => {
          empty.hidden = true;
          list.prepend(eventItem(ev));
          while (list.children.length > MAX_EVENTS) list.lastChild.remove();
          if (onEvent) onEvent(ev);
        },
        onClose: (info) => {
          if (stopped || stream !== s) return;
          status.textContent = 'Disconnected';
          status.className = 'badge bad';
          if (info.code !== 1000) {
            msg.show(`The event stream closed (code ${info.code}${info.reason ? `: ${info.reason}` : ''}); reconnecting in ${Math.round(delay / 1000)} s.`);
          }
          retry = setTimeout(open, delay);
          delay = Math.min(delay * 2, 30000);
        },
      });
    } catch (err) {
      msg.show(err);
      return;
    }
    stream = s;
  };
  open();
  onLeave(() => {
    stopped = true;
    if (retry) clearTimeout(retry);
    closeStream(stream);
  });
  return section(
    'Live events',
    h('div', { class: 'panel-head' }, h('span', {}, 'Stream: ', status), clearBtn),
    msg.el,
    empty,
    list,
  );
}

function viewHome(main, homeId) {
  const msg = messages();
  const titleSlot = h('div');
  main.append(titleSlot);
  const setTitle = (name) => {
    clear(titleSlot);
    append(titleSlot, pageTitle(name, [['Homes', '#/homes'], [name, null]]));
  };
  setTitle(`Home #${homeId}`);
  const list = deviceList(msg, (after) => session.client.listDevices({ home: homeId, limit: 100, after }));
  const poll = every(LIST_POLL_MS, () => act(null, msg, () => list.refresh()));
  const devicesSection = section('Devices', msg.el, list.el);
  main.append(h('div', { class: 'columns' }, h('div', { class: 'col-main' }, devicesSection, session.role === 'admin' ? createDeviceForm(homeId, () => poll.kick()) : null), h('div', { class: 'col-side' }, eventsPanel(homeId, (ev) => {
    if (typeof ev.eventType === 'string' && ev.eventType.startsWith('_device')) poll.kick();
  }))));
  act(null, msg, async () => {
    const home = await homeById(homeId);
    setTitle(home.name);
    await list.refresh();
  });
}

// ---------------------------------------------------------------------------------------------
// A device: status, keys (live), commands, key rotation.

function viewDevice(main, deviceId, homeIdHint) {
  const scope = { device: deviceId };
  const titleSlot = h('div');
  main.append(titleSlot);
  const setTitle = (device) => {
    clear(titleSlot);
    const name = device ? device.name : `Device #${deviceId}`;
    const homeId = device ? device.homeId : homeIdHint;
    const crumbs = homeId
      ? [['Homes', '#/homes'], [(session.homes.get(homeId) || {}).name || `Home #${homeId}`, `#/homes/${homeId}`], [name, null]]
      : [['Devices', '#/devices'], [name, null]];
    append(titleSlot, pageTitle(name, crumbs));
  };
  setTitle(null);

  // --- status ---
  const statusMsg = messages();
  const statusList = h('dl', { class: 'facts' });
  let device = null;
  const renderStatus = () => {
    clear(statusList);
    if (!device) return;
    const sync = device.sync || {};
    const fact = (k, ...v) => [h('dt', { text: k }), h('dd', {}, ...v)];
    append(
      statusList,
      fact('Id', String(device.id)),
      fact('Connection', connectionBadge(device)),
      fact('Sync', syncSummary(device.sync)),
      fact('Last applied', timeEl(sync.appliedTime)),
      fact('Last connected', timeEl(device.lastConnectTime)),
      fact('Last disconnected', timeEl(device.lastDisconnectTime)),
      fact('Class / tag', [device.deviceClass, device.tag].filter(Boolean).join(' / ') || '—'),
      fact('Created', timeEl(device.creationTime)),
    );
  };
  let homeEvents = null;
  // The device object (with its sync status): the admin and project keys that see the device.
  const fetchDevice = () => session.client.getDevice(deviceId);
  const loadDevice = async () => {
    const d = await fetchDevice();
    const firstLoad = device === null;
    device = d;
    renderStatus();
    if (firstLoad) {
      setTitle(d);
      if (d.homeId && !session.homes.has(d.homeId)) {
        homeById(d.homeId).then(() => setTitle(device), (err) => statusMsg.show(err, 'Its home:'));
      }
      if (d.homeId) watchHomeEvents(d.homeId);
    }
  };
  const statusPoll = every(DEVICE_POLL_MS, () => act(null, statusMsg, loadDevice));
  // The device's presence and acknowledgements arrive as events of its home: refresh at once.
  const watchHomeEvents = (homeId) => {
    let stopped = false;
    const open = () => {
      if (stopped) return;
      homeEvents = session.client.events({
        home: homeId,
        onEvent: (ev) => {
          if (ev.eventData && Number(ev.eventData.deviceId) === deviceId) statusPoll.kick();
          else if (ev.originDeviceId === deviceId) statusPoll.kick();
        },
        onClose: (info) => {
          if (!stopped && info.code !== 1000) setTimeout(open, 5000);
        },
      });
    };
    open();
    onLeave(() => {
      stopped = true;
      closeStream(homeEvents);
    });
  };

  // --- keys, live ---
  const keysMsg = messages();
  const mirrorStatus = h('span', { class: 'badge muted', role: 'status', id: 'mirror-status', text: 'Connecting' });
  const revEl = h('span', { class: 'muted small-text', id: 'mirror-rev' });
  const tbody = h('tbody');
  const rows = new Map();
  const emptyKeys = h('p', { class: 'muted', hidden: true, text: 'This device has no keys yet.' });
  const editorSlot = h('div');
  let editor = null; // the open editor: {key, baseRev, onServerChange(change)}
  const keysTable = h(
    'table',
    { class: 'list keys' },
    h('caption', { class: 'sr-only', text: 'Keys of this device' }),
    h('thead', {}, h('tr', {}, h('th', { scope: 'col', text: 'Key' }), h('th', { scope: 'col', text: 'Value' }), h('th', { scope: 'col', text: 'Actions' }))),
    tbody,
  );

  const keyRow = (key, value) => {
    const valueCell = h('td', { 'data-label': 'Value' }, h('code', { class: 'value', text: compactJson(value) }));
    const tr = h(
      'tr',
      { dataset: { key } },
      h('th', { scope: 'row', 'data-label': 'Key' }, h('code', { class: 'key', text: key })),
      valueCell,
      h(
        'td',
        { 'data-label': 'Actions', class: 'row-actions' },
        button('Edit', { class: 'secondary small', 'aria-label': `Edit ${key}`, onClick: () => openEditor(key) }),
        ' ',
        confirmButton('Delete', `Yes, delete ${key}`, () =>
          act(null, keysMsg, async () => {
            const r = await session.client.deleteKey(scope, key);
            keysMsg.ok(`Deleted “${key}” (store rev ${r.rev}).`);
          }),
          { 'aria-label': `Delete ${key}` },
        ),
      ),
    );
    return { tr, valueCell };
  };

  const setRow = (key, value, flash) => {
    const existing = rows.get(key);
    if (existing) {
      clear(existing.valueCell).append(h('code', { class: 'value', text: compactJson(value) }));
      if (flash) flashRow(existing.tr);
      return;
    }
    const r = keyRow(key, value);
    rows.set(key, r);
    const after = [...rows.keys()].filter((k) => k > key).sort()[0];
    if (after) tbody.insertBefore(r.tr, rows.get(after).tr);
    else tbody.append(r.tr);
    if (flash) flashRow(r.tr);
    emptyKeys.hidden = true;
  };
  const removeRow = (key) => {
    const r = rows.get(key);
    if (!r) return;
    // Keep focus on the page if it was inside the row that goes.
    if (r.tr.contains(document.activeElement)) keysTable.focus();
    r.tr.remove();
    rows.delete(key);
    emptyKeys.hidden = rows.size > 0;
  };
  const flashRow = (tr) => {
    tr.classList.remove('flash');
    void tr.offsetWidth;
    tr.classList.add('flash');
  };

  const mirror = session.client.mirror(deviceId);
  const showRev = () => {
    revEl.textContent = `store rev ${mirror.rev} · ${mirror.size} ${mirror.size === 1 ? 'key' : 'keys'}`;
  };
  mirror.addEventListener('status', (e) => {
    const s = e.detail.status;
    const label = { connecting: 'Connecting', live: 'Live', offline: 'Offline — reconnecting', closed: 'Closed' }[s] || s;
    mirrorStatus.textContent = label;
    mirrorStatus.className = `badge ${s === 'live' ? 'good' : s === 'offline' ? 'bad' : 'muted'}`;
    mirrorStatus.dataset.status = s;
  });
  mirror.addEventListener('reload', () => {
    const entries = mirror.entries();
    const keep = new Set(entries.map(([k]) => k));
    for (const k of [...rows.keys()]) if (!keep.has(k)) removeRow(k);
    for (const [k, v] of entries) setRow(k, v, false);
    emptyKeys.hidden = entries.length > 0;
    showRev();
    if (editor) editor.onServerChange({ key: editor.key, value: mirror.get(editor.key), rev: null, deleted: mirror.get(editor.key) === undefined, reload: true });
  });
  mirror.addEventListener('change', (e) => {
    const c = e.detail;
    if (c.deleted) removeRow(c.key);
    else setRow(c.key, c.value, true);
    showRev();
    statusPoll.kick();
    if (editor && editor.key === c.key) editor.onServerChange(c);
  });
  mirror.addEventListener('batch', () => showRev());
  mirror.addEventListener('error', (e) => keysMsg.show(e.detail.error, 'Live view:'));
  mirror.connect().then(
    () => {
      keysMsg.clear();
      showRev();
      statusPoll.kick();
    },
    () => {},
  );
  onLeave(() => closeMirror(mirror));

  // --- the editor of one key: conditional writes ---
  const openEditor = (key) => {
    closeEditor();
    const emsg = messages();
    const conflict = h('div');
    const stale = h('div', { 'aria-live': 'polite' });
    const value = field(`Value of ${key} (JSON)`, { kind: 'textarea', rows: '6', id: 'edit-value', hint: 'Any JSON value but null, e.g. 21.5, "eco", true, [1, 2] or {"a": 1}. Ctrl+Enter saves, Escape closes.' });
    submitOnCtrlEnter(value.input);
    const baseEl = h('span', { class: 'muted small-text' });
    const save = h('button', { type: 'submit', text: 'Save' });
    const close = button('Close', { class: 'secondary', onClick: () => closeEditor(true) });
    const patch = field('Merge patch (JSON object, RFC 7396)', { kind: 'textarea', rows: '3', id: 'merge-patch', placeholder: '{"member": "new value", "old": null}', hint: 'Members set to null are removed; the rest are added or replaced. Ctrl+Enter applies.' });
    submitOnCtrlEnter(patch.input);
    const mergeBtn = h('button', { type: 'submit', text: 'Apply merge patch' });
    const state = { key, baseRev: undefined, baseValue: undefined };

    const setBase = (item) => {
      state.baseRev = item.rev;
      state.baseValue = item.value;
      value.input.value = prettyJson(item.value);
      baseEl.textContent = `Editing rev ${item.rev}, last written ${fmtTime(item.modificationTime)}. Saving applies only if nobody changed the key since (If-Match).`;
      clear(stale);
    };

    const showConflict = async (err, yourText) => {
      clear(conflict);
      let current = null;
      try {
        current = await session.client.getKey(scope, key);
      } catch (e) {
        if (!(e instanceof DdpError && e.status === 404)) {
          emsg.show(e, 'Conflict, and the current value could not be read:');
          return;
        }
      }
      const theirs = current
        ? [h('p', {}, `The server now holds rev ${current.rev} (written ${fmtTime(current.modificationTime)}):`), h('pre', { class: 'value', text: prettyJson(current.value) })]
        : [h('p', { text: 'The key has been deleted since you loaded it.' })];
      const reload = button('Load the current value', {
        onClick: () => {
          clear(conflict);
          if (current) setBase(current);
          else closeEditor(true);
          value.input.focus();
        },
      });
      const overwriteNote = h('p', { class: 'small-text muted', text: 'Your text stays in the box: reload, then apply your change again if it still makes sense.' });
      conflict.append(
        h(
          'div',
          { class: 'alert conflict', role: 'alert' },
          h('h3', { text: 'Conflict: not saved' }),
          h('p', {}, `Someone else changed “${key}” after you loaded it (you edited rev ${state.baseRev}). The server refused your change (${err.reason}, ${err.status}), so nothing was overwritten.`),
          theirs,
          yourText !== undefined ? [h('p', { text: 'Your change:' }), h('pre', { class: 'value', text: yourText })] : null,
          h('div', { class: 'actions' }, reload),
          overwriteNote,
        ),
      );
      reload.focus();
    };

    const form = h(
      'form',
      {
        id: 'edit-form',
        onSubmit: (e) => {
          e.preventDefault();
          clear(conflict);
          const text = value.input.value;
          const r = valueProblem(text);
          if (r.problem) {
            emsg.show(r.problem, 'Not sent:');
            value.input.setAttribute('aria-invalid', 'true');
            value.input.focus();
            return;
          }
          value.input.removeAttribute('aria-invalid');
          act(save, emsg, async () => {
            try {
              const rev = await putText(scope, key, text, { ifMatch: state.baseRev });
              state.baseRev = rev;
              state.baseValue = JSON.parse(text);
              baseEl.textContent = `Saved as rev ${rev}. Editing rev ${rev}.`;
              clear(stale);
              emsg.ok(`Saved “${key}” (rev ${rev}).`);
            } catch (err) {
              if (err instanceof DdpError && err.status === 412) return showConflict(err, text);
              throw err;
            }
          });
        },
      },
      value.wrap,
      baseEl,
      h('div', { class: 'actions' }, save, close),
    );
    const mergeForm = h(
      'form',
      {
        id: 'merge-form',
        onSubmit: (e) => {
          e.preventDefault();
          clear(conflict);
          const text = patch.input.value;
          const r = patchProblem(text);
          if (r.problem) {
            emsg.show(r.problem, 'Not sent:');
            patch.input.setAttribute('aria-invalid', 'true');
            patch.input.focus();
            return;
          }
          patch.input.removeAttribute('aria-invalid');
          act(mergeBtn, emsg, async () => {
            try {
              const rev = await mergeText(scope, key, text, { ifMatch: state.baseRev });
              const item = await session.client.getKey(scope, key);
              setBase(item);
              patch.input.value = '';
              emsg.ok(`Merged into “${key}” (rev ${rev}).`);
            } catch (err) {
              if (err instanceof DdpError && err.status === 412) return showConflict(err, text);
              throw err;
            }
          });
        },
      },
      patch.wrap,
      h('div', { class: 'actions' }, mergeBtn),
    );
    const panel = h(
      'section',
      { class: 'card editor', 'aria-labelledby': 'editor-title' },
      h('h2', { id: 'editor-title', tabindex: '-1' }, 'Edit ', h('code', { text: key })),
      form,
      stale,
      conflict,
      emsg.el,
      h('details', { class: 'merge' }, h('summary', { text: 'Merge patch' }), mergeForm),
    );
    editor = {
      key,
      onServerChange(c) {
        if (state.baseRev === undefined) return;
        if (c.reload ? !c.deleted && JSON.stringify(c.value) === JSON.stringify(state.baseValue) : c.rev <= state.baseRev) return;
        clear(stale);
        stale.append(
          h('p', { class: 'alert warn' }, c.deleted ? `“${key}” was deleted on the server while you edit it.` : `“${key}” changed on the server while you edit it${c.rev ? ` (now rev ${c.rev})` : ''}. Saving will be refused as a conflict unless you load the current value.`),
        );
      },
    };
    panel.addEventListener('keydown', (e) => {
      if (e.key === 'Escape') {
        e.preventDefault();
        closeEditor(true);
      }
    });
    clear(editorSlot).append(panel);
    value.input.value = '';
    value.input.disabled = true;
    act(null, emsg, async () => {
      try {
        const item = await session.client.getKey(scope, key);
        setBase(item);
      } finally {
        value.input.disabled = false;
      }
      panel.scrollIntoView({ block: 'nearest' });
      value.input.focus();
    });
  };
  const closeEditor = (refocus) => {
    const key = editor && editor.key;
    editor = null;
    clear(editorSlot);
    if (refocus && key && rows.get(key)) rows.get(key).tr.querySelector('button').focus();
  };

  // --- add a key ---
  const addMsg = messages();
  const newKey = field('Key', { id: 'new-key', maxlength: '255', placeholder: 'e.g. target_temp', hint: 'Letters, digits and _ - : . (at most 255).' });
  const newValue = field('Value (JSON)', { kind: 'textarea', rows: '2', id: 'new-value', placeholder: '21.5' });
  const createOnly = checkbox('Create only (refuse if the key exists)', { checked: true, id: 'new-create-only' });
  submitOnCtrlEnter(newValue.input);
  const addBtn = h('button', { type: 'submit', text: 'Add key' });
  const addForm = h(
    'form',
    {
      id: 'add-form',
      class: 'grid-form',
      onSubmit: (e) => {
        e.preventDefault();
        const key = newKey.input.value;
        const kp = keyProblem(key);
        if (kp) {
          addMsg.show(kp, 'Not sent:');
          newKey.input.setAttribute('aria-invalid', 'true');
          newKey.input.focus();
          return;
        }
        newKey.input.removeAttribute('aria-invalid');
        const r = valueProblem(newValue.input.value);
        if (r.problem) {
          addMsg.show(r.problem, 'Not sent:');
          newValue.input.setAttribute('aria-invalid', 'true');
          newValue.input.focus();
          return;
        }
        newValue.input.removeAttribute('aria-invalid');
        act(addBtn, addMsg, async () => {
          try {
            const rev = await putText(scope, key, newValue.input.value, { ifNoneMatch: createOnly.input.checked });
            addMsg.ok(`Set “${key}” (rev ${rev}).`);
            addForm.reset();
            createOnly.input.checked = true;
          } catch (err) {
            if (err instanceof DdpError && err.status === 412) {
              throw new DdpError(`“${key}” exists already, so it was not overwritten; edit it in the list, or untick “Create only”. (${err.message})`, { status: 412, reason: err.reason });
            }
            throw err;
          }
        });
      },
    },
    newKey.wrap,
    newValue.wrap,
    createOnly.wrap,
    h('div', { class: 'actions' }, addBtn),
  );

  const keysSection = h(
    'section',
    { class: 'card', 'aria-labelledby': 'keys-title' },
    h('div', { class: 'panel-head' }, h('h2', { id: 'keys-title', text: 'Keys' }), h('span', {}, mirrorStatus, ' ', revEl)),
    keysMsg.el,
    h('div', { class: 'table-wrap' }, keysTable),
    emptyKeys,
  );
  keysTable.setAttribute('tabindex', '-1');

  // --- commands ---
  const cmdMsg = messages();
  const action = field('Action', { id: 'command-action', maxlength: '255', placeholder: 'e.g. reboot' });
  const params = field('Parameters (optional JSON object)', { kind: 'textarea', rows: '2', id: 'command-parameters', placeholder: '{"delay": 5}' });
  submitOnCtrlEnter(params.input);
  const cmdBtn = h('button', { type: 'submit', text: 'Send command' });
  const cmdForm = h(
    'form',
    {
      class: 'grid-form',
      onSubmit: (e) => {
        e.preventDefault();
        const a = action.input.value;
        if (a.length === 0 || a.length > 255) return cmdMsg.show('An action is 1–255 characters.', 'Not sent:');
        let body = `{"action":${JSON.stringify(a)}}`;
        const text = params.input.value.trim();
        if (text) {
          const r = parseJsonText(text, 'The parameters');
          if (r.problem) return cmdMsg.show(r.problem, 'Not sent:');
          if (!r.value || typeof r.value !== 'object' || Array.isArray(r.value)) return cmdMsg.show('The parameters are a JSON object, e.g. {"delay": 5}.', 'Not sent:');
          body = `{"action":${JSON.stringify(a)},"parameters":${text}}`;
        }
        act(cmdBtn, cmdMsg, async () => {
          // Sent as typed (numbers exact); the same request as client.sendCommand.
          await session.client.request('PUT', `/devices/${deviceId}/command`, { body });
          cmdMsg.ok(`Sent “${a}” to the device's live sessions.`);
        });
      },
    },
    action.wrap,
    params.wrap,
    h('div', { class: 'actions' }, cmdBtn),
  );

  // --- rotate the device key (admin) ---
  let rotateSection = null;
  if (session.role === 'admin') {
    const rmsg = messages();
    const result = h('div');
    rotateSection = section(
      'Device key',
      h('p', { class: 'muted', text: 'A new key stops the old one at once and closes the sessions that used it.' }),
      confirmButton('Rotate key', 'Rotate now: the old key stops', () =>
        act(null, rmsg, async () => {
          const r = await session.client.rotateDeviceKey(deviceId);
          clear(result).append(secretBox('New device key', r.apiKey, 'the new key'));
          rmsg.ok('The device key was rotated; the old key no longer works.');
        }),
      ),
      rmsg.el,
      result,
    );
  }

  main.append(
    h(
      'div',
      { class: 'columns' },
      h('div', { class: 'col-main' }, editorSlot, keysSection, section('Add a key', addForm, addMsg.el)),
      h('div', { class: 'col-side' }, section('Status', statusMsg.el, statusList), section('Send a command', cmdForm, cmdMsg.el), rotateSection),
    ),
  );
  act(null, statusMsg, loadDevice);
}

// ---------------------------------------------------------------------------------------------
// Jobs.

function jobStateBadge(job) {
  const cls = { running: 'warn', done: 'good', cancelled: 'muted' }[job.state] || 'muted';
  return h('span', { class: `badge ${cls}`, text: job.state });
}

function progressBar(label, n, of) {
  const id = nextId('p');
  return h(
    'div',
    { class: 'progress' },
    h('label', { for: id }, h('span', { text: label }), h('span', { class: 'num', text: `${n} / ${of}` })),
    h('progress', { id, max: String(Math.max(of, 1)), value: String(of ? n : 0) }),
  );
}

function jobProgress(job) {
  return h(
    'div',
    { class: 'job-progress' },
    progressBar('Written', job.written, job.selected),
    progressBar('Delivered', job.delivered, job.selected),
    progressBar('Applied', job.applied, job.selected),
    job.failed ? h('p', { class: 'bad-text small-text', text: `${job.failed} failed` }) : null,
  );
}

/** Worth polling quickly: running, or ended in the last ten minutes with devices yet to confirm. */
function jobBusy(job) {
  if (job.state === 'running') return true;
  const ended = job.endTime ? Date.parse(job.endTime) : NaN;
  const recent = !Number.isNaN(ended) && Date.now() - ended < 10 * 60 * 1000;
  return recent && (job.delivered < job.written || job.applied < job.written);
}

function viewJobs(main) {
  const msg = messages();
  const tbody = h('tbody');
  const empty = h('p', { class: 'muted', hidden: true, text: 'No jobs yet.' });
  const table = h(
    'table',
    { class: 'list jobs' },
    h('caption', { class: 'sr-only', text: 'Jobs' }),
    h('thead', {}, h('tr', {}, ['Job', 'State', 'Progress', 'Created', 'Actions'].map((t) => h('th', { scope: 'col', text: t })))),
    tbody,
  );
  let jobs = [];
  const render = () => {
    clear(tbody);
    empty.hidden = jobs.length > 0;
    for (const job of [...jobs].sort((a, b) => b.id - a.id)) {
      tbody.append(
        h(
          'tr',
          { dataset: { job: job.id } },
          h('td', { 'data-label': 'Job' }, h('a', { href: `#/jobs/${job.id}`, text: `Job #${job.id}` }), h('div', { class: 'muted small-text', text: `${job.selected} ${job.selected === 1 ? 'device' : 'devices'} · ${job.ops.length} ${job.ops.length === 1 ? 'op' : 'ops'}` })),
          h('td', { 'data-label': 'State' }, jobStateBadge(job)),
          h('td', { 'data-label': 'Progress' }, jobProgress(job)),
          h('td', { 'data-label': 'Created' }, timeEl(job.creationTime)),
          h('td', { 'data-label': 'Actions' }, job.state === 'running' ? confirmButton('Cancel', `Cancel job #${job.id}`, () => act(null, msg, async () => {
            await session.client.cancelJob(job.id);
            msg.ok(`Job #${job.id} cancelled.`);
            await load();
          })) : h('span', { class: 'muted', text: '—' })),
        ),
      );
    }
  };
  const load = async () => {
    jobs = await session.client.listJobs();
    render();
  };
  // Poll quickly while a job runs or has devices yet to confirm, slowly otherwise.
  let timer = null;
  let stopped = false;
  const tick = async () => {
    timer = null;
    await act(null, msg, load);
    if (stopped) return;
    const busy = jobs.some(jobBusy);
    timer = setTimeout(tick, busy ? JOB_POLL_MS : LIST_POLL_MS);
  };
  onLeave(() => {
    stopped = true;
    if (timer) clearTimeout(timer);
  });
  main.append(pageTitle('Jobs'));
  main.append(section('Jobs', msg.el, h('div', { class: 'table-wrap' }, table), empty));
  main.append(createJobForm(() => {
    if (timer) clearTimeout(timer);
    tick();
  }));
  tick();
}

function createJobForm(onCreated) {
  const msg = messages();
  const homeOptions = [['', 'Any home'], ...[...session.homes.values()].map((x) => [String(x.id), `${x.name} (#${x.id})`])];
  const home = field('Home', { kind: 'select', id: 'job-home', options: homeOptions });
  const where = field('Where (one condition a line)', { kind: 'textarea', rows: '2', id: 'job-where', placeholder: 'fw<2.1', hint: 'As in the device search: fw<2.1, mode="eco", fw, !fw.' });
  const cls = field('Device class', { id: 'job-class' });
  const tag = field('Tag', { id: 'job-tag' });
  const ids = field('Device ids (optional)', { id: 'job-ids', placeholder: '12, 13, 20', inputmode: 'numeric' });
  const connected = field('Connection', { kind: 'select', id: 'job-connected', options: [['', 'Any'], ['true', 'Connected'], ['false', 'Offline']] });
  const all = checkbox('Every device the key sees (no filter)', { id: 'job-all' });
  const ops = field('Ops (JSON array)', {
    kind: 'textarea',
    rows: '4',
    id: 'job-ops',
    hint: 'Applied as one batch to each device: {"op":"set","key","value"}, {"op":"delete","key"}, {"op":"merge","key","value":{…}}.',
  });
  ops.input.value = '[{"op": "set", "key": "fw_target", "value": "2.1"}]';
  const rate = field('Rate (devices a second, optional)', { id: 'job-rate', inputmode: 'decimal', placeholder: 'unlimited' });
  submitOnCtrlEnter(where.input);
  submitOnCtrlEnter(ops.input);
  const submit = h('button', { type: 'submit', text: 'Create job' });
  const form = h(
    'form',
    {
      id: 'job-form',
      class: 'grid-form',
      onSubmit: (e) => {
        e.preventDefault();
        const select = {};
        if (home.input.value) select.homeId = Number(home.input.value);
        const w = where.input.value.split('\n').map((x) => x.trim()).filter(Boolean);
        if (w.length) select.where = w;
        if (cls.input.value.trim()) select.deviceClass = cls.input.value.trim();
        if (tag.input.value.trim()) select.tag = tag.input.value.trim();
        if (connected.input.value) select.isConnected = connected.input.value === 'true';
        const idText = ids.input.value.trim();
        if (idText) {
          const list = idText.split(/[\s,]+/).filter(Boolean);
          if (!list.every((x) => /^[1-9][0-9]*$/.test(x))) return msg.show('Device ids are whole numbers separated by commas.', 'Not sent:');
          select.ids = list.map(Number);
        }
        if (all.input.checked) select.all = true;
        if (Object.keys(select).length === 0) return msg.show('Choose which devices to write (a filter, ids, or “every device”).', 'Not sent:');
        const r = opsProblem(ops.input.value);
        if (r.problem) return msg.show(r.problem, 'Not sent:');
        let rateText = '';
        if (rate.input.value.trim()) {
          const n = Number(rate.input.value.trim());
          if (!(n > 0 && n <= 1000000)) return msg.show('The rate is a number of devices a second, above 0 and at most 1,000,000.', 'Not sent:');
          rateText = `,"rate":${n}`;
        }
        act(submit, msg, async () => {
          // The ops go as typed (numbers exact); the same request as client.createJob.
          const res = await session.client.request('POST', '/jobs', { body: `{"select":${JSON.stringify(select)},"ops":${ops.input.value.trim()}${rateText}}` });
          const job = res.body;
          msg.info(h('p', { class: 'alert ok', role: 'status' }, `Job #${job.id} created: ${job.selected} ${job.selected === 1 ? 'device' : 'devices'} selected. `, h('a', { href: `#/jobs/${job.id}`, text: 'Follow it' })));
          onCreated(job);
        });
      },
    },
    home.wrap,
    cls.wrap,
    tag.wrap,
    connected.wrap,
    where.wrap,
    ids.wrap,
    all.wrap,
    ops.wrap,
    rate.wrap,
    h('div', { class: 'actions' }, submit),
  );
  return section('New job', form, msg.el);
}

function viewJob(main, jobId) {
  const msg = messages();
  const body = h('div');
  main.append(pageTitle(`Job #${jobId}`, [['Jobs', '#/jobs'], [`Job #${jobId}`, null]]));
  main.append(section('Progress', msg.el, body));
  let timer = null;
  let stopped = false;
  const render = (job) => {
    clear(body);
    const fact = (k, ...v) => [h('dt', { text: k }), h('dd', {}, ...v)];
    body.append(
      h('dl', { class: 'facts' }, fact('State', jobStateBadge(job)), fact('Selected', String(job.selected)), fact('Failed', String(job.failed)), fact('Rate', job.rate ? `${job.rate} devices/s` : 'unlimited'), fact('Created', timeEl(job.creationTime)), fact('Ended', timeEl(job.endTime))),
      jobProgress(job),
      h('h3', { text: 'Selection' }),
      h('pre', { class: 'value', text: prettyJson(job.select) }),
      h('h3', { text: 'Ops' }),
      h('pre', { class: 'value', text: prettyJson(job.ops) }),
    );
    if (job.errors && job.errors.length) {
      body.append(h('h3', { text: 'Errors' }), h('ul', { class: 'errors' }, job.errors.map((e) => h('li', {}, h('a', { href: `#/devices/${e.deviceId}`, text: `device #${e.deviceId}` }), `: ${e.reason}`))));
    }
    if (job.state === 'running') {
      body.append(h('div', { class: 'actions' }, confirmButton('Cancel job', 'Cancel: write no more devices', () => act(null, msg, async () => {
        render(await session.client.cancelJob(jobId));
        msg.ok('Cancelled: no further device is written.');
      }))));
    }
  };
  const tick = async () => {
    timer = null;
    const job = await act(null, msg, () => session.client.getJob(jobId));
    if (stopped) return;
    if (job) render(job);
    const busy = !job || jobBusy(job);
    timer = setTimeout(tick, busy ? JOB_POLL_MS : LIST_POLL_MS);
  };
  onLeave(() => {
    stopped = true;
    if (timer) clearTimeout(timer);
  });
  tick();
}

// ---------------------------------------------------------------------------------------------
// Project API keys (admin).

function viewApiKeys(main) {
  main.append(pageTitle('Project keys'));
  if (session.role !== 'admin') {
    main.append(h('p', { class: 'alert warn', text: 'Only the admin key may manage project keys.' }));
    return;
  }
  const msg = messages();
  const tbody = h('tbody');
  const empty = h('p', { class: 'muted', hidden: true, text: 'No project keys yet.' });
  const table = h(
    'table',
    { class: 'list' },
    h('caption', { class: 'sr-only', text: 'Project keys' }),
    h('thead', {}, h('tr', {}, ['Name', 'Permission', 'Homes', 'Created', 'Actions'].map((t) => h('th', { scope: 'col', text: t })))),
    tbody,
  );
  const homeName = (id) => (session.homes.get(id) || {}).name || `#${id}`;
  const render = (keys) => {
    clear(tbody);
    empty.hidden = keys.length > 0;
    for (const k of keys) {
      tbody.append(
        h(
          'tr',
          {},
          h('td', { 'data-label': 'Name' }, k.name, h('span', { class: 'muted small-text', text: ` #${k.id}` })),
          h('td', { 'data-label': 'Permission', text: k.permission === 'readWrite' ? 'read and write' : 'read' }),
          h('td', { 'data-label': 'Homes', text: k.homes ? (k.homes.length ? k.homes.map(homeName).join(', ') : 'none') : 'all homes' }),
          h('td', { 'data-label': 'Created' }, timeEl(k.creationTime)),
          h('td', { 'data-label': 'Actions' }, confirmButton('Revoke', `Revoke “${k.name}”`, () => act(null, msg, async () => {
            await session.client.deleteApiKey(k.id);
            msg.ok(`Project key “${k.name}” revoked; its sessions are closed.`);
            render(await session.client.listApiKeys());
          }))),
        ),
      );
    }
  };
  main.append(section('Project keys', msg.el, h('div', { class: 'table-wrap' }, table), empty));

  const fmsg = messages();
  const result = h('div');
  const name = field('Name', { id: 'apikey-name', required: true, maxlength: '255', placeholder: 'e.g. Mobile app' });
  const perm = field('Permission', { kind: 'select', id: 'apikey-permission', options: [['read', 'Read'], ['readWrite', 'Read and write']] });
  const allHomes = checkbox('All homes (and devices in no home)', { id: 'apikey-all', checked: true });
  const homeBox = h('fieldset', { class: 'homes-pick', disabled: true }, h('legend', { text: 'Only these homes' }));
  const homeChecks = [];
  const fillHomes = () => {
    for (const c of homeChecks) c.wrap.remove();
    homeChecks.length = 0;
    for (const home of session.homes.values()) {
      const c = checkbox(home.name, { value: String(home.id) });
      homeChecks.push(c);
      homeBox.append(c.wrap);
    }
    if (!homeChecks.length) homeBox.append(h('p', { class: 'muted', text: 'No homes yet.' }));
  };
  allHomes.input.addEventListener('change', () => {
    homeBox.disabled = allHomes.input.checked;
  });
  const submit = h('button', { type: 'submit', text: 'Create project key' });
  const form = h(
    'form',
    {
      id: 'apikey-form',
      class: 'grid-form',
      onSubmit: (e) => {
        e.preventDefault();
        clear(result);
        if (!name.input.value.trim()) return fmsg.show('A project key needs a name.', 'Not sent:');
        const body = { name: name.input.value.trim(), permission: perm.input.value };
        if (!allHomes.input.checked) body.homes = homeChecks.filter((c) => c.input.checked).map((c) => Number(c.input.value));
        act(submit, fmsg, async () => {
          const k = await session.client.createApiKey(body);
          fmsg.ok(`Project key “${k.name}” created.`);
          result.append(secretBox(`Project key “${k.name}”`, k.key, 'this key'));
          form.reset();
          homeBox.disabled = true;
          render(await session.client.listApiKeys());
        });
      },
    },
    name.wrap,
    perm.wrap,
    allHomes.wrap,
    homeBox,
    h('div', { class: 'actions' }, submit),
  );
  main.append(section('New project key', form, fmsg.el, result));
  act(null, msg, async () => {
    await loadHomes();
    fillHomes();
    render(await session.client.listApiKeys());
  });
}

// ---------------------------------------------------------------------------------------------
// Start.

async function start() {
  document.getElementById('sign-out').addEventListener('click', signOut);
  window.addEventListener('hashchange', route);
  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) {
    try {
      await signIn(saved);
    } catch (err) {
      sessionStorage.removeItem(TOKEN_KEY);
      const main = document.getElementById('main');
      clear(main);
      viewSignIn(main, err);
      firstRender = false;
      return;
    }
  }
  route();
}

start();
