// The page at `/`: submits an edit (POST /v1/edits) and follows its Server-Sent Events,
// drawing one card per seed candidate. Plain browser JavaScript, no dependencies. Text
// that comes from the server (instructions, judge reasoning, errors) is only ever set with
// textContent.
'use strict';

(() => {
  const $ = (selector, root = document) => root.querySelector(selector);

  /** A new element with a class and text. */
  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  const TOKEN_KEY = 'icedit-scale.token';
  const FINAL = new Set(['done', 'failed', 'cancelled']);
  const EVENT_NAMES = ['queued', 'started', 'spawned', 'step', 'live', 'screened', 'selected',
    'finished', 'scored', 'short_run', 'compared', 'done', 'failed', 'cancelled'];
  const PHASES = {
    probe: 'probing', complete: 'completing', generate: 'generating',
    short: 'short run', rerun: 're-running',
  };
  const OUTCOMES = {
    pruned: 'pruned', completed: 'completed', eliminated: 'eliminated',
    champion: 'champion', pooled: 'pooled, not completed',
  };
  const STRATEGY_HINTS = {
    '': 'The server\'s default strategy and knobs; fields left empty use its defaults.',
    random: 'One seed at full steps: the baseline.',
    'best-of-n': 'N seeds at full steps each; the best by VIE O is picked.',
    'early-filter': 'N seeds probed k steps and screened; the best M that pass are completed.',
    tournament: 'A short k-step run per seed, compared pairwise; the winner is re-run at full steps.',
    'successive-halving': 'Probe k steps, keep the better half, probe k more, … until M remain.',
    adaptive: 'Seeds in waves; stops once a completed candidate reaches the target score.',
  };

  const ui = {
    form: $('#form'), drop: $('#drop'), image: $('#image'), thumb: $('#thumb'),
    dropInfo: $('#drop-info'), prompt: $('#prompt'), strategy: $('#strategy'),
    strategyHint: $('#strategy-hint'), live: $('#live'), token: $('#token'), more: $('#more'),
    submit: $('#submit'), cancel: $('#cancel'), formError: $('#form-error'),
    status: $('#status'), statusDetail: $('#status-detail'), elapsed: $('#elapsed'),
    runTitle: $('#run-title'), counters: $('#counters'), runError: $('#run-error'),
    runHead: $('#run-head'), logBox: $('#log-box'), empty: $('#empty'), result: $('#result'), compare: $('#compare'), after: $('#compare img.after'),
    before: $('#compare img.before'), slider: $('#slider'), summary: $('#summary'),
    grid: $('#grid'), log: $('#log'), history: $('#history'), historyEmpty: $('#history-empty'),
    historyRefresh: $('#history-refresh'),
  };
  /** Optional request fields: form element id = API field name. */
  const KNOBS = ['strategy', 'seeds', 'probe_steps', 'keep', 'steps', 'seed', 'wave', 'target', 'size', 'budget_nfe',
    'refine', 'refine_strength', 'refine_keep_unchanged', 'refine_best', 'cache'];

  // ---- the API -------------------------------------------------------------------------

  const token = () => ui.token.value.trim();

  /** `url` with the token as `access_token` (for EventSource and <img>, which send no headers). */
  function withToken(url) {
    const t = token();
    if (!t || !url) return url;
    return url + (url.includes('?') ? '&' : '?') + 'access_token=' + encodeURIComponent(t);
  }

  /** Opens a file link of a token-protected server: fetched with the token in its header,
   *  shown from a blob: URL (a link with the token in it would land in the address bar,
   *  the history, and whatever the link is pasted into). Without a token, the plain link. */
  async function openWithToken(event, url) {
    if (!token()) return;
    event.preventDefault();
    const tab = window.open('', '_blank'); // opened within the click: no popup blocker
    try {
      const response = await fetch(url, { headers: { Authorization: 'Bearer ' + token() } });
      if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
      const blobUrl = URL.createObjectURL(await response.blob());
      if (tab) tab.location.href = blobUrl;
      else window.location.href = blobUrl;
    } catch (err) {
      if (tab) tab.close();
      ui.runError.textContent = `Could not open ${url}: ${err.message}`;
      ui.runError.hidden = false;
    }
  }

  /** A JSON API call; throws an Error carrying the server's message, status and field. */
  async function api(method, url, body) {
    const headers = {};
    if (token()) headers.Authorization = 'Bearer ' + token();
    const response = await fetch(url, { method, headers, body });
    let data = null;
    try { data = await response.json(); } catch (_) { /* not JSON */ }
    if (!response.ok) {
      const error = new Error((data && data.error && data.error.message)
        || `${response.status} ${response.statusText}`);
      error.status = response.status;
      error.param = data && data.error ? data.error.param : null;
      throw error;
    }
    return data;
  }

  // ---- the source image ----------------------------------------------------------------

  let file = null;
  let fileUrl = null;

  function formatBytes(n) {
    if (n < 1024) return `${n} B`;
    if (n < 1 << 20) return `${(n / 1024).toFixed(0)} KB`;
    return `${(n / (1 << 20)).toFixed(1)} MB`;
  }

  function setFile(f) {
    if (!f) return;
    if (f.type && !f.type.startsWith('image/')) {
      showFormError(`${f.name} is not an image (PNG, JPEG or WebP).`);
      return;
    }
    clearFormError();
    file = f;
    ui.dropInfo.textContent = '';
    if (fileUrl) URL.revokeObjectURL(fileUrl);
    fileUrl = URL.createObjectURL(f);
    ui.thumb.onload = () => {
      ui.dropInfo.textContent =
        `${f.name || 'pasted image'} · ${ui.thumb.naturalWidth}×${ui.thumb.naturalHeight} · ${formatBytes(f.size)}`;
    };
    // A file the browser cannot decode is refused here, not after its upload.
    ui.thumb.onerror = () => {
      if (file !== f) return;
      file = null;
      ui.drop.classList.remove('has-image');
      showFormError(`${f.name || 'The pasted file'} cannot be read as an image (PNG, JPEG or WebP).`, ui.drop);
    };
    ui.thumb.src = fileUrl;
    ui.drop.classList.add('has-image');
  }

  ui.image.addEventListener('change', () => setFile(ui.image.files[0]));
  for (const name of ['dragenter', 'dragover']) {
    ui.drop.addEventListener(name, (e) => { e.preventDefault(); ui.drop.classList.add('over'); });
  }
  for (const name of ['dragleave', 'dragend']) {
    ui.drop.addEventListener(name, () => ui.drop.classList.remove('over'));
  }
  ui.drop.addEventListener('drop', (e) => {
    e.preventDefault();
    ui.drop.classList.remove('over');
    const f = e.dataTransfer && e.dataTransfer.files[0];
    if (f) setFile(f);
  });
  // A file dropped beside the zone should not navigate away from the page.
  window.addEventListener('dragover', (e) => e.preventDefault());
  window.addEventListener('drop', (e) => e.preventDefault());
  // Pasting an image (e.g. a screenshot) picks it too.
  document.addEventListener('paste', (e) => {
    const item = [...(e.clipboardData ? e.clipboardData.items : [])]
      .find((i) => i.kind === 'file' && i.type.startsWith('image/'));
    if (item) setFile(item.getAsFile());
  });

  // ---- form ----------------------------------------------------------------------------

  // The message sits just above the submit button, and is scrolled into view: after a
  // refused submit the user sees why, even when the field at fault is further up.
  function showFormError(message, field) {
    ui.formError.textContent = message;
    ui.formError.hidden = false;
    if (field) {
      field.classList.add('invalid');
      if (field.focus) field.focus({ preventScroll: true });
    }
    ui.formError.scrollIntoView({ block: 'nearest' });
    // The field too, where both fit on the screen.
    if (field && field.getBoundingClientRect) {
      const f = field.getBoundingClientRect();
      const e = ui.formError.getBoundingClientRect();
      if (Math.max(f.bottom, e.bottom) - Math.min(f.top, e.top) <= window.innerHeight) {
        field.scrollIntoView({ block: 'nearest' });
      }
    }
  }

  function clearFormError() {
    ui.formError.hidden = true;
    ui.formError.textContent = '';
    for (const node of ui.form.querySelectorAll('.invalid')) node.classList.remove('invalid');
  }

  /** The form element behind an API field name (`param` of an error). */
  function fieldFor(param) {
    if (!param) return null;
    if (param === 'image') return ui.drop;
    if (param === 'live_previews') return ui.live;
    const field = document.getElementById(param === 'seed_list' ? 'seeds' : param);
    if (field && field.closest('#more')) ui.more.open = true;
    return field;
  }

  /** Opens the token field with why: none given yet, or the one given was refused. */
  function askForToken() {
    ui.more.open = true;
    showFormError(token()
      ? 'The server refused this access token; check it (More options).'
      : 'This server needs its access token (More options).', ui.token);
  }

  ui.token.value = localStorage.getItem(TOKEN_KEY) || '';
  ui.token.addEventListener('change', () => {
    if (token()) localStorage.setItem(TOKEN_KEY, token());
    else localStorage.removeItem(TOKEN_KEY);
    clearFormError();
    refreshHistory();
    // An edit whose stream the missing token closed is followed again with the new one.
    if (run && !run.ended && !ui.runError.hidden) follow(run.id);
  });

  const showHint = () => { ui.strategyHint.textContent = STRATEGY_HINTS[ui.strategy.value] || ''; };
  ui.strategy.addEventListener('change', showHint);
  showHint();

  ui.form.addEventListener('input', (e) => e.target.classList.remove('invalid'));

  ui.form.addEventListener('submit', async (e) => {
    e.preventDefault();
    clearFormError();
    if (!file) return showFormError('Choose an image first.', ui.drop);
    const prompt = ui.prompt.value.trim();
    if (!prompt) return showFormError('Write what to change in the image.', ui.prompt);
    const form = new FormData();
    form.append('image', file, file.name || 'image.png');
    form.append('prompt', prompt);
    for (const name of KNOBS) {
      const value = document.getElementById(name).value.trim();
      if (value) form.append(name, value);
    }
    form.append('live_previews', ui.live.checked ? 'true' : 'false');
    ui.submit.disabled = true;
    ui.submit.textContent = 'Uploading…';
    try {
      const accepted = await api('POST', '/v1/edits', form);
      follow(accepted.id, {
        events: accepted.links && accepted.links.events,
        source: fileUrl,
        instruction: prompt,
        strategy: ui.strategy.value,
      });
      refreshHistory();
      bringRunIntoView();
    } catch (err) {
      if (err.status === 401) askForToken();
      else showFormError(err.message, fieldFor(err.param));
    } finally {
      ui.submit.disabled = false;
      ui.submit.textContent = 'Edit image';
    }
  });

  // One column (a phone): the form or the history fills the screen, so bring the followed
  // edit into view.
  function bringRunIntoView() {
    if (window.matchMedia('(max-width: 820px)').matches) {
      ui.result.parentElement.scrollIntoView({ behavior: 'smooth', block: 'start' });
    }
  }

  // ---- one followed edit ---------------------------------------------------------------

  /** The edit the page follows: its id, event stream, cards and counters. */
  let run = null;

  function setStatus(state, detail) {
    ui.status.textContent = state;
    ui.status.className = `status s-${state}${FINAL.has(state) ? ' final' : ''}`;
    if (detail !== undefined) ui.statusDetail.textContent = detail;
    document.title = state === 'idle' ? 'icedit-scale' : `${state} · icedit-scale`;
  }

  function stopFollowing() {
    if (!run) return;
    if (run.events) run.events.close();
    clearInterval(run.timer);
  }

  function tickElapsed(r) {
    ui.elapsed.textContent = `${((performance.now() - r.started) / 1000).toFixed(1)} s`;
  }

  /** Follows edit `id`: clears the view and opens its event stream (from its first event). */
  function follow(id, info = {}) {
    stopFollowing();
    const r = {
      id, cards: new Map(), screens: new Map(), lastSeq: -1, state: 'queued', ended: false,
      source: info.source || null, started: performance.now(), timer: 0, events: null,
    };
    run = r;
    if (location.hash !== `#${id}`) history.replaceState(null, '', `#${id}`);
    ui.grid.replaceChildren();
    ui.log.replaceChildren();
    ui.summary.replaceChildren();
    ui.result.hidden = true;
    ui.compare.hidden = false;
    ui.after.classList.remove('loaded');
    ui.after.removeAttribute('src');
    ui.before.removeAttribute('src');
    ui.empty.hidden = true;
    ui.runHead.hidden = false;
    ui.logBox.hidden = false;
    ui.runError.hidden = true;
    ui.elapsed.textContent = '';
    setTitle(r, info.instruction, info.strategy);
    setStatus('queued', '');
    updateCounters(r);
    ui.cancel.hidden = false;
    ui.cancel.disabled = false;
    markCurrentInHistory();
    if (!info.instruction || !info.strategy) {
      api('GET', `/v1/edits/${encodeURIComponent(id)}`)
        .then((edit) => { if (run === r) setTitle(r, edit.instruction, edit.strategy && edit.strategy.kind); })
        .catch(() => {});
    }
    r.timer = setInterval(() => tickElapsed(r), 200);
    const events = new EventSource(withToken(info.events || `/v1/edits/${encodeURIComponent(id)}/events`));
    r.events = events;
    for (const name of EVENT_NAMES) {
      events.addEventListener(name, (ev) => onEvent(r, name, ev));
    }
    events.onerror = () => {
      if (run !== r || r.ended) return;
      if (events.readyState === EventSource.CLOSED) {
        // Refused (unknown edit, missing token): ask the API why.
        api('GET', `/v1/edits/${encodeURIComponent(id)}`)
          .then((edit) => streamLost(r, `the event stream closed (the edit is ${edit.status})`))
          .catch((err) => {
            if (err.status === 401) askForToken();
            streamLost(r, err.message);
          });
      } else {
        ui.statusDetail.textContent = 'reconnecting…';
      }
    };
  }

  function streamLost(r, message) {
    if (run !== r) return;
    clearInterval(r.timer);
    ui.cancel.hidden = true;
    ui.runError.textContent = message;
    ui.runError.hidden = false;
  }

  function setTitle(r, instruction, strategy) {
    ui.runTitle.replaceChildren();
    if (instruction) ui.runTitle.append(el('q', null, instruction));
    ui.runTitle.append(el('span', 'muted small', ` ${strategy ? `${strategy} · ` : ''}${r.id}`));
  }

  function onEvent(r, name, ev) {
    if (run !== r) return;
    const seq = Number(ev.lastEventId);
    if (ev.lastEventId !== '' && Number.isFinite(seq)) {
      if (seq <= r.lastSeq) return; // replayed after a reconnect
      r.lastSeq = seq;
    }
    let data = {};
    try { data = JSON.parse(ev.data); } catch (_) { /* keep {} */ }
    logEvent(seq, name, data);
    const handler = HANDLERS[name];
    if (handler) handler(r, data);
    updateCounters(r);
  }

  function logEvent(seq, name, data) {
    const item = el('li');
    item.append(el('b', null, name), el('span', 'muted', ` #${seq} `));
    let text = JSON.stringify(data);
    if (text.length > 240) text = `${text.slice(0, 240)}…`;
    item.append(el('code', null, text));
    ui.log.append(item);
    while (ui.log.childElementCount > 400) ui.log.firstElementChild.remove();
  }

  function updateCounters(r) {
    const cards = [...r.cards.values()];
    const count = (cls) => cards.filter((c) => c.root.classList.contains(cls)).length;
    const parts = [`${cards.length} candidate${cards.length === 1 ? '' : 's'}`];
    const screened = r.screens.size;
    if (screened) parts.push(`${screened} screened`);
    const pruned = count('pruned');
    if (pruned) parts.push(`${pruned} pruned`);
    const finished = count('finished');
    if (finished) parts.push(`${finished} finished`);
    const scored = count('scored');
    if (scored) parts.push(`${scored} scored`);
    ui.counters.textContent = cards.length ? parts.join(' · ') : '';
  }

  const fixed = (x, digits = 1) => (typeof x === 'number' ? x.toFixed(digits) : '–');

  /** One candidate's card. */
  class Card {
    constructor(index, seed) {
      this.index = index;
      this.root = el('article', 'card');
      this.root.dataset.candidate = String(index);
      const pic = el('div', 'pic');
      this.img = el('img');
      this.img.alt = `Candidate ${index}`;
      this.img.hidden = true;
      this.img.addEventListener('load', () => { this.img.hidden = false; setAspect(this.img); });
      this.placeholder = el('span', 'placeholder', `#${index}`);
      this.flag = el('span', 'flag');
      this.flag.hidden = true;
      pic.append(this.placeholder, this.img, el('span', 'index', `#${index}`), this.flag);
      const body = el('div', 'body');
      const head = el('div', 'card-head');
      this.seedText = el('span', 'seed muted');
      this.state = el('span', 'state', 'waiting');
      head.append(this.seedText, this.state);
      this.bar = el('div', 'bar');
      this.fill = el('i');
      this.tick = el('b', 'tick');
      this.tick.hidden = true;
      this.bar.append(this.fill, this.tick);
      this.stepText = el('div', 'step muted small', '');
      this.screen = el('div', 'screen');
      this.screen.hidden = true;
      this.reasoning = el('p', 'reasoning');
      this.reasoning.hidden = true;
      this.reasoning.title = 'Click to expand';
      this.reasoning.addEventListener('click', () => this.reasoning.classList.toggle('open'));
      this.vie = el('div', 'vie');
      this.vie.hidden = true;
      this.note = el('div', 'note');
      this.note.hidden = true;
      body.append(head, this.bar, this.stepText, this.screen, this.reasoning, this.vie, this.note);
      this.root.append(pic, body);
      this.setSeed(seed);
    }

    setSeed(seed) {
      if (seed === undefined || seed === null) return;
      this.root.dataset.seed = String(seed);
      this.seedText.textContent = `seed ${seed}`;
    }

    setImage(url) {
      if (url) this.img.src = withToken(url);
    }

    setState(text) { this.state.textContent = text; }

    setFlag(text, kind) {
      this.flag.textContent = text;
      this.flag.className = `flag ${kind}`;
      this.flag.hidden = false;
    }

    setNote(text, kind = '') {
      this.note.textContent = text;
      this.note.className = `note ${kind}`;
      this.note.hidden = !text;
    }

    progress(phase, step, toStep, steps) {
      this.setState(PHASES[phase] || phase);
      const total = Math.max(1, steps || 1);
      this.fill.style.width = `${Math.min(100, (100 * step) / total)}%`;
      this.bar.dataset.phase = phase;
      if (toStep && toStep < total) {
        this.tick.hidden = false;
        this.tick.style.left = `${(100 * toStep) / total}%`;
      }
      this.stepText.textContent = toStep && toStep < total
        ? `step ${step}/${total} · to ${toStep}`
        : `step ${step}/${total}`;
    }
  }

  /** Sets the page's image aspect (width / height) from a loaded image. */
  function setAspect(img) {
    if (!img.naturalWidth || !img.naturalHeight) return;
    document.documentElement.style.setProperty('--ar', String(img.naturalWidth / img.naturalHeight));
  }

  function card(r, index, seed) {
    let c = r.cards.get(index);
    if (!c) {
      c = new Card(index, seed);
      r.cards.set(index, c);
      const after = [...r.cards.values()].filter((o) => o.index > index)
        .sort((a, b) => a.index - b.index)[0];
      ui.grid.insertBefore(c.root, after ? after.root : null);
    } else if (seed !== undefined) {
      c.setSeed(seed);
    }
    return c;
  }

  /** Why a dropped candidate was pruned, from its last screening. */
  function pruneReason(r, index, step, keptCount) {
    const s = r.screens.get(index);
    if (!s) return `pruned at step ${step}`;
    if (s.failed) return `pruned at step ${step}: the judge failed on its preview`;
    if (s.pass === false) return `pruned at step ${step}: failed screening (${fixed(s.score)})`;
    return `pruned at step ${step}: ${fixed(s.score)} ranked below the ${keptCount} kept`;
  }

  const HANDLERS = {
    queued(r, d) {
      const ahead = Number(d.position) || 0;
      setStatus('queued', ahead ? `${ahead} ahead` : 'next in line');
    },
    started(r, d) {
      r.state = 'running';
      setStatus('running', d.worker ? `on ${d.worker}` : '');
      refreshHistory();
    },
    spawned(r, d) {
      for (const c of d.candidates || []) card(r, c.index, c.seed).setState('spawned');
    },
    step(r, d) {
      if (r.state !== 'running') {
        r.state = 'running';
        setStatus('running');
      }
      for (const index of d.candidates || []) {
        card(r, index).progress(d.phase, d.step, d.to_step, d.steps);
      }
    },
    live(r, d) {
      card(r, d.candidate).setImage(d.url);
    },
    screened(r, d) {
      const c = card(r, d.candidate);
      r.screens.set(d.candidate, d);
      c.setImage(d.url);
      c.screen.replaceChildren();
      c.screen.hidden = false;
      c.root.classList.add('screened');
      if (d.failed) {
        c.screen.append(el('span', 'badge warn', 'judge failed'), el('span', 'muted', ` at step ${d.step}`));
        c.reasoning.textContent = d.failed;
      } else {
        c.screen.append(
          el('span', `badge ${d.pass ? 'pass' : 'fail'}`, d.pass ? 'pass' : 'fail'),
          Object.assign(el('span', 'score', ` ${fixed(d.score)}`), { title: 'screening score' }),
          el('span', 'muted', ` · step ${d.step}`),
        );
        c.reasoning.textContent = d.reasoning || '';
      }
      c.reasoning.hidden = !c.reasoning.textContent;
      c.setState('screened');
    },
    selected(r, d) {
      const kept = d.kept || [];
      for (const index of kept) {
        const c = card(r, index);
        c.setState('kept');
        c.root.classList.add('kept');
      }
      for (const index of d.dropped || []) {
        const c = card(r, index);
        c.root.classList.add('pruned');
        c.setState('pruned');
        c.setFlag('pruned', 'pruned');
        c.setNote(pruneReason(r, index, d.step, kept.length), 'why');
      }
    },
    finished(r, d) {
      const c = card(r, d.candidate);
      c.setImage(d.url);
      c.root.classList.add('finished');
      c.fill.style.width = '100%';
      c.setState('finished');
    },
    scored(r, d) {
      const c = card(r, d.candidate);
      c.vie.replaceChildren();
      c.vie.hidden = false;
      c.root.classList.add('scored');
      if (d.failed) {
        c.vie.append(el('span', 'badge warn', 'VIE failed'));
        c.vie.title = d.failed;
      } else if (d.unscored) {
        c.vie.append(el('span', 'muted', 'not scored (no judge)'));
      } else {
        for (const [label, value] of [['SC', d.sc], ['PQ', d.pq], ['O', d.overall]]) {
          const part = el('span', label === 'O' ? 'metric overall' : 'metric');
          part.append(el('small', null, label), el('b', null, fixed(value)));
          c.vie.append(part);
        }
      }
    },
    // Tournament: each seed's short run, the image the comparisons judge.
    short_run(r, d) {
      const c = card(r, d.candidate);
      if (d.url) c.setImage(d.url);
      c.setState('short run');
    },
    compared(r, d) {
      const loser = d.winner === d.champion ? d.challenger : d.champion;
      const why = d.decision ? `: ${d.decision}` : '';
      card(r, loser).setNote(`lost to #${d.winner}${why}`, 'why');
      card(r, loser).root.classList.add('eliminated');
      // A champion keeps every win, not only the last.
      const winner = card(r, d.winner);
      winner.wins = (winner.wins || []).concat(`#${loser}`);
      winner.setNote(`won against ${winner.wins.join(', ')}`);
    },
    done(r, d) {
      end(r, 'done', d.seconds !== undefined ? `in ${fixed(d.seconds)} s` : '');
      for (const c of d.candidates || []) {
        const k = card(r, c.index, c.seed);
        k.root.dataset.status = c.status;
        k.setState(OUTCOMES[c.status] || c.status);
        if (c.status === 'pruned' && !k.root.classList.contains('pruned')) {
          k.root.classList.add('pruned');
          k.setFlag('pruned', 'pruned');
        }
        if (c.status === 'eliminated') k.root.classList.add('eliminated');
        if (c.final_url && !k.root.classList.contains('finished')) {
          k.root.classList.add('finished');
          k.setImage(c.final_url);
        }
      }
      if (d.pick) {
        const k = card(r, d.pick.index);
        k.root.classList.add('pick');
        k.setFlag('pick', 'pick');
        k.setState('picked');
      }
      showResult(r, d);
    },
    failed(r, d) {
      stopCards(r);
      end(r, 'failed', '');
      ui.runError.textContent = d.error || 'the edit failed';
      ui.runError.hidden = false;
    },
    cancelled(r) {
      stopCards(r);
      end(r, 'cancelled', '');
    },
  };

  /** Marks the candidates still in flight when an edit fails or is cancelled. */
  function stopCards(r) {
    for (const c of r.cards.values()) {
      const cls = c.root.classList;
      if (!cls.contains('finished') && !cls.contains('pruned') && !cls.contains('eliminated')) {
        cls.add('stopped');
        c.setState('stopped');
      }
    }
  }

  function end(r, state, detail) {
    r.ended = true;
    r.state = state;
    if (r.events) r.events.close();
    clearInterval(r.timer);
    ui.elapsed.textContent = '';
    ui.cancel.hidden = true;
    setStatus(state, detail);
    refreshHistory();
  }

  /** The before/after view and the numbers of a finished edit. */
  function showResult(r, d) {
    ui.summary.replaceChildren();
    if (d.final_url) {
      ui.result.hidden = false;
      ui.after.src = withToken(d.final_url);
      const sources = r.source ? [r.source]
        : ['png', 'jpg', 'webp'].map((ext) => withToken(`/v1/edits/${r.id}/files/source.${ext}`));
      let next = 0;
      ui.before.onerror = () => { if (++next < sources.length) ui.before.src = sources[next]; };
      ui.before.src = sources[0];
      setDivider(50);
    } else {
      ui.result.hidden = false;
      ui.compare.hidden = true;
    }
    const nfe = el('p', 'nfe');
    nfe.append('NFE spent ', el('b', null, d.nfe), ' vs best-of-N ', el('b', null, d.best_of_n_nfe));
    ui.summary.append(nfe);
    if (typeof d.nfe === 'number' && d.best_of_n_nfe) {
      const saved = 1 - d.nfe / d.best_of_n_nfe;
      const line = saved >= 0
        ? `${Math.round(saved * 100)}% less compute than best-of-N`
        : `${Math.round(-saved * 100)}% more compute than best-of-N`;
      ui.summary.append(el('p', 'muted small', `${line}; a single run costs ${d.random_nfe}.`));
    }
    const facts = el('dl', 'facts');
    const fact = (term, value) => { if (value !== '' && value != null) facts.append(el('dt', null, term), el('dd', null, value)); };
    if (d.pick) {
      fact('Pick', `#${d.pick.index} (seed ${d.pick.seed})${typeof d.pick.overall === 'number' ? ` · O ${fixed(d.pick.overall)}` : ''}`);
      fact('Why', d.pick.reason);
    } else {
      fact('Pick', 'none: no candidate finished');
    }
    if (d.judge) fact('Judge', `${d.judge.calls} calls${d.judge.failures ? `, ${d.judge.failures} failed` : ''}`);
    if (typeof d.seconds === 'number') fact('Time', `${fixed(d.seconds)} s`);
    ui.summary.append(facts);
    if (d.notes && d.notes.length) {
      const notes = el('ul', 'notes');
      for (const n of d.notes) notes.append(el('li', null, n));
      ui.summary.append(notes);
    }
    const links = el('p', 'links small');
    for (const [text, url] of [['final image', d.final_url], ['contact sheet', d.contact_sheet_url], ['report.json', d.report_url]]) {
      if (!url) continue;
      const a = el('a', null, text);
      // The link itself carries no token, so copying or sharing it never shares the
      // server's token; with one set, a click fetches the file with it instead.
      a.href = url;
      a.target = '_blank';
      a.rel = 'noopener';
      a.addEventListener('click', (e) => openWithToken(e, url));
      links.append(a);
    }
    ui.summary.append(links);
  }

  function setDivider(percent) {
    ui.slider.value = String(percent);
    ui.compare.style.setProperty('--pos', `${percent}%`);
  }

  ui.slider.addEventListener('input', () => setDivider(Number(ui.slider.value)));
  ui.after.addEventListener('load', () => {
    ui.compare.hidden = false;
    ui.after.classList.add('loaded');
    setAspect(ui.after);
  });

  ui.cancel.addEventListener('click', async () => {
    if (!run || run.ended) return;
    const r = run;
    ui.cancel.disabled = true;
    ui.statusDetail.textContent = 'cancelling…';
    try {
      const answer = await api('DELETE', `/v1/edits/${encodeURIComponent(r.id)}`);
      if (run === r && !r.ended && answer.note) ui.statusDetail.textContent = answer.note;
    } catch (err) {
      if (run === r) {
        ui.cancel.disabled = false;
        ui.runError.textContent = err.message;
        ui.runError.hidden = false;
      }
    }
  });

  // ---- history -------------------------------------------------------------------------

  function ago(created) {
    const s = Math.max(0, Date.now() / 1000 - created);
    if (s < 60) return 'just now';
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
    return new Date(created * 1000).toLocaleDateString();
  }

  let historyRequest = 0;
  async function refreshHistory() {
    const mine = ++historyRequest;
    let edits;
    try {
      edits = (await api('GET', '/v1/edits')).data || [];
    } catch (err) {
      if (mine !== historyRequest) return;
      ui.history.replaceChildren();
      ui.historyEmpty.hidden = false;
      ui.historyEmpty.textContent = err.status === 401
        ? 'This server needs its access token (More options).'
        : `History unavailable: ${err.message}`;
      // Asked at once, not after the user has filled in the form.
      if (err.status === 401) askForToken();
      return;
    }
    if (mine !== historyRequest) return;
    ui.history.replaceChildren(...edits.map((e) => {
      const item = el('li');
      item.dataset.id = e.id;
      const button = el('button', 'history-item');
      button.type = 'button';
      button.append(
        el('span', `status small s-${e.status}`, e.status),
        el('span', 'instruction', e.instruction || '(no instruction)'),
        el('span', 'muted small', `${e.strategy || ''} · ${ago(e.created)}`),
      );
      button.addEventListener('click', () => {
        follow(e.id, { instruction: e.instruction, strategy: e.strategy });
        bringRunIntoView();
      });
      item.append(button);
      return item;
    }));
    ui.historyEmpty.hidden = edits.length > 0;
    ui.historyEmpty.textContent = 'No edits yet.';
    markCurrentInHistory();
  }

  function markCurrentInHistory() {
    for (const item of ui.history.children) {
      item.classList.toggle('current', !!run && item.dataset.id === run.id);
    }
  }

  ui.historyRefresh.addEventListener('click', refreshHistory);
  window.addEventListener('focus', refreshHistory);

  // ---- start ---------------------------------------------------------------------------

  // Refine widths past what this server planned for (`serve --max-refine`) would be
  // refused: offer them disabled, saying why.
  async function limitRefines() {
    let health;
    try { health = await api('GET', '/healthz'); } catch (_) { return; }
    const max = health && Number.isFinite(health.max_refine) ? health.max_refine : null;
    if (max === null) return;
    for (const option of document.querySelectorAll('#size option, #refine option')) {
      const width = Number(option.value);
      if (option.value !== '' && width > 512 && width > max) {
        option.disabled = true;
        option.textContent += max === 0
          ? ' (this server does not refine)'
          : ` (this server refines up to ${max} px)`;
      }
    }
  }

  limitRefines();
  refreshHistory();
  // A reload (or a shared link) follows the edit named in the address, and so does an id
  // pasted into the address of the open page.
  function followHash() {
    const fromHash = decodeURIComponent(location.hash.slice(1));
    if (/^[\w-]+$/.test(fromHash) && !(run && run.id === fromHash)) follow(fromHash);
  }
  window.addEventListener('hashchange', followHash);
  followHash();
})();
