// The run report's concept tree (inlined into index.html; no library, nothing fetched).
// The data is embedded once as JSON (#report-data); only the current page of concepts is built
// as DOM, so a 20k-feature run opens as fast as a small one. The view state lives in the URL
// hash (#q=12&sort=size&page=2&open=3,5&feature=17): a link or `chromium --dump-dom URL#q=...`
// reproduces a filtered, expanded view without driving the page.
(function () {
  'use strict';
  var D = JSON.parse(document.getElementById('report-data').textContent);
  var tree = document.getElementById('tree');
  if (!tree) return;
  var $ = function (id) { return document.getElementById(id); };
  var st = {q: '', sort: 'size', dir: 'desc', page: 1, open: {}, feature: null};
  var shown = [];  // indices into D.concepts after filtering and sorting
  var renders = 0;

  function esc(s) {
    return String(s).replace(/[&<>"']/g, function (c) {
      return {'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;'}[c];
    });
  }
  function fmt(x, n) { return x === null || x === undefined ? '—' : x.toFixed(n); }

  function readHash() {
    var h = location.hash.replace(/^#/, '');
    h.split('&').forEach(function (kv) {
      if (!kv) return;
      var i = kv.indexOf('='), k = i < 0 ? kv : kv.slice(0, i);
      var v = i < 0 ? '' : decodeURIComponent(kv.slice(i + 1).replace(/\+/g, ' '));
      if (k === 'q') st.q = v;
      else if (k === 'sort' && ['size', 'coherence', 'id'].indexOf(v) >= 0) st.sort = v;
      else if (k === 'dir' && (v === 'asc' || v === 'desc')) st.dir = v;
      else if (k === 'page') st.page = Math.max(1, parseInt(v, 10) || 1);
      else if (k === 'open') v.split(',').forEach(function (c) { if (c !== '') st.open[c] = 1; });
      else if (k === 'feature' && v !== '') st.feature = v;
    });
  }
  function writeHash() {
    var parts = [];
    if (st.q) parts.push('q=' + encodeURIComponent(st.q));
    if (st.sort !== 'size') parts.push('sort=' + st.sort);
    if (st.dir !== 'desc') parts.push('dir=' + st.dir);
    if (st.page > 1) parts.push('page=' + st.page);
    var open = Object.keys(st.open);
    if (open.length) parts.push('open=' + open.join(','));
    if (st.feature !== null) parts.push('feature=' + st.feature);
    history.replaceState(null, '', parts.length ? '#' + parts.join('&') : location.pathname);
  }

  function featureLabel(f) {
    return (D.flabel && D.flabel[f]) || '';
  }
  // A query is an id ("12": concept 12 or a concept holding feature 12; "c12" / "f12": only
  // that kind) or else a substring of a concept's or a member's dominant label.
  function matcher(q) {
    q = q.trim().toLowerCase();
    if (!q) return null;
    var m = /^([cf]?)\s*(\d+)$/.exec(q);
    if (m) {
      var n = parseInt(m[2], 10);
      return function (c) {
        var byC = m[1] !== 'f' && c[0] === n, byF = m[1] !== 'c' && c[1].indexOf(n) >= 0;
        return byC || byF ? {feature: byF ? n : null} : null;
      };
    }
    return function (c) {
      if (c[4] && c[4].toLowerCase().indexOf(q) >= 0) return {feature: null};
      for (var i = 0; i < c[1].length; i++) {
        if (featureLabel(c[1][i]).toLowerCase().indexOf(q) >= 0) return {feature: c[1][i]};
      }
      return null;
    };
  }

  var hits = {};
  function compute() {
    var match = matcher(st.q);
    hits = {};
    shown = [];
    D.concepts.forEach(function (c, i) {
      var h = match ? match(c) : {feature: null};
      if (h) { shown.push(i); if (h.feature !== null) hits[c[0]] = h.feature; }
    });
    var key = {size: function (c) { return c[1].length; },
               coherence: function (c) { return c[3] === null ? -2 : c[3]; },
               id: function (c) { return c[0]; }}[st.sort];
    var sgn = st.dir === 'asc' ? 1 : -1;
    shown.sort(function (a, b) {
      var ka = key(D.concepts[a]), kb = key(D.concepts[b]);
      return ka === kb ? D.concepts[a][0] - D.concepts[b][0] : sgn * (ka - kb);
    });
  }

  function tiles(top, title) {
    if (!top || !top.length) return '<div class="panel muted">' + esc(title) +
        ': no top-activating images (not an image run, or it never fired)</div>';
    var html = '<div class="panel"><h3>' + esc(title) + '</h3><div class="tiles">';
    top.forEach(function (t) {
      var im = (D.images || {})[t[0]] || [null, null];
      html += '<div class="tile" data-image-id="' + t[0] + '"><div class="pic">' +
          (im[0] ? '<img loading="lazy" src="' + esc(im[0]) + '" alt="image ' + t[0] + '">' : '') +
          '<canvas data-heat="' + esc(JSON.stringify([t[2], t[3]])) + '"></canvas></div>' +
          'image ' + t[0] + (im[1] ? ' · ' + esc(im[1]) : '') + ' · ' + fmt(t[1], 2) + '</div>';
    });
    return html + '</div></div>';
  }
  function labelsLine(lab) {
    if (!lab || !lab.length) return '';
    return '<div class="labels">dominant labels: ' + lab.map(function (l) {
      return esc(l[0]) + ' (' + l[1] + ')';
    }).join(', ') + '</div>';
  }
  // The heat map: one cell per patch of the harvest's grid, alpha = activation / max.
  function paint(root) {
    if (!D.grid) return;
    var gh = D.grid[0], gw = D.grid[1];
    root.querySelectorAll('canvas[data-heat]').forEach(function (cv) {
      var hv = JSON.parse(cv.getAttribute('data-heat'));
      cv.width = gw; cv.height = gh;
      var ctx = cv.getContext('2d');
      for (var i = 0; i < hv[0].length; i++) {
        ctx.fillStyle = 'rgba(255,0,0,' + (hv[1][i] / 255).toFixed(3) + ')';
        ctx.fillRect(hv[0][i] % gw, Math.floor(hv[0][i] / gw), 1, 1);
      }
      cv.removeAttribute('data-heat');
    });
  }

  // Panel data (top images, labels) comes in parts, report/data/{f,c}<part>.js, each loaded by
  // a script element the first time one of its ids is opened; the concept is rebuilt then.
  var parts = {}, waiting = {};
  window.csaeReportPart = function (kind, part, obj) { parts[kind + part] = obj; };
  function panel(kind, id, conceptId) {
    if (!D.panels) return false;
    var part = Math.floor(id / D.panels.part), key = kind + part;
    if (key in parts) return parts[key][id] || false;
    if (D.panels[kind].indexOf(part) < 0) return false;
    if (!(key in waiting)) {
      waiting[key] = {};
      var s = document.createElement('script');
      s.src = 'data/' + key + '.js';
      s.onload = s.onerror = function () {
        if (!(key in parts)) parts[key] = {};  // a missing file: panels say so
        Object.keys(waiting[key]).forEach(function (cid) {
          var el = tree.querySelector('[data-concept-id="' + cid + '"]');
          if (el) rerenderConcept(el);
        });
      };
      document.head.appendChild(s);
    }
    waiting[key][conceptId] = 1;
    return null;
  }
  function panelHtml(kind, id, conceptId, title) {
    var p = panel(kind, id, conceptId);
    if (p === null) return '<div class="panel muted loading">' + esc(title) + ': loading…</div>';
    return labelsLine(p && p[1]) + tiles(p && p[0], title);
  }
  function featurePanel(f, conceptId) {
    return '<div class="feature-panel" data-panel-feature="' + f + '">' +
        panelHtml('f', f, conceptId, 'feature ' + f + ': top-activating images') + '</div>';
  }
  function conceptBody(c) {
    var html = '<ul class="members">';
    c[1].forEach(function (f, j) {
      var cls = 'feature' + (hits[c[0]] === f ? ' hit' : '') +
          (String(st.feature) === String(f) ? ' sel' : '');
      var lab = featureLabel(f);
      html += '<li class="' + cls + '" data-feature-id="' + f + '">feature ' + f +
          '<span class="w">' + fmt(c[2][j], 2) + '</span>' +
          (lab ? '<span class="label">' + esc(lab) + '</span>' : '') + '</li>';
    });
    html += '</ul>';
    if (st.feature !== null && c[1].indexOf(parseInt(st.feature, 10)) >= 0) {
      html += featurePanel(st.feature, c[0]);
    }
    if (st.open[c[0]] && D.panels) {
      html += panelHtml('c', c[0], c[0], 'concept ' + c[0] + ': top-activating images');
    }
    return html;
  }

  function render() {
    var ps = D.page_size, pages = Math.max(1, Math.ceil(shown.length / ps));
    st.page = Math.min(st.page, pages);
    var lo = (st.page - 1) * ps, html = '';
    shown.slice(lo, lo + ps).forEach(function (i) {
      var c = D.concepts[i];
      var open = st.open[c[0]] || (st.feature !== null &&
          c[1].indexOf(parseInt(st.feature, 10)) >= 0);
      html += '<details class="concept" data-concept-id="' + c[0] + '"' +
          (open ? ' open' : '') + '><summary><span class="cid">concept ' + c[0] + '</span>' +
          '<span class="badge">' + c[1].length + ' members</span>' +
          '<span class="badge">coherence ' + fmt(c[3], 3) + '</span>' +
          (c[4] ? '<span class="label">' + esc(c[4]) + '</span>' : '') + '</summary>' +
          conceptBody(c) + '</details>';
    });
    tree.innerHTML = html || '<p class="muted" id="empty">no concept matches "' +
        esc(st.q) + '"</p>';
    $('count').textContent = shown.length + ' of ' + D.concepts.length + ' concepts' +
        (pages > 1 ? ' · page ' + st.page + ' of ' + pages : '');
    $('prev').disabled = st.page <= 1;
    $('next').disabled = st.page >= pages;
    paint(tree);
    writeHash();
    renders += 1;
    document.body.setAttribute('data-renders', renders);  // tests wait on it
  }

  function rerenderConcept(el) {
    var id = parseInt(el.getAttribute('data-concept-id'), 10);
    var c = D.concepts.filter(function (x) { return x[0] === id; })[0];
    var summary = el.querySelector('summary').outerHTML;
    el.innerHTML = summary + conceptBody(c);
    paint(el);
  }

  tree.addEventListener('toggle', function (e) {
    var el = e.target;
    if (!el.matches || !el.matches('details.concept')) return;
    var id = el.getAttribute('data-concept-id');
    if (el.open) st.open[id] = 1; else delete st.open[id];
    if (el.open && D.panels) rerenderConcept(el);  // the image panel is built on first open
    writeHash();
  }, true);
  tree.addEventListener('click', function (e) {
    var li = e.target.closest && e.target.closest('li.feature');
    if (!li) return;
    var f = li.getAttribute('data-feature-id');
    st.feature = String(st.feature) === f ? null : f;
    document.querySelectorAll('details.concept').forEach(function (el) {
      if (el.querySelector('li.feature.sel') || el.contains(li)) rerenderConcept(el);
    });
    writeHash();
  });
  var timer = null;
  $('q').addEventListener('input', function () {
    clearTimeout(timer);
    timer = setTimeout(function () { st.q = $('q').value; st.page = 1; compute(); render(); }, 120);
  });
  $('sort').addEventListener('change', function () {
    var v = $('sort').value.split(':');
    st.sort = v[0]; st.dir = v[1]; compute(); render();
  });
  $('prev').addEventListener('click', function () { st.page -= 1; render(); });
  $('next').addEventListener('click', function () { st.page += 1; render(); });
  $('expand').addEventListener('click', function () {
    shown.slice((st.page - 1) * D.page_size, st.page * D.page_size).forEach(function (i) {
      st.open[D.concepts[i][0]] = 1;
    });
    render();
  });
  $('collapse').addEventListener('click', function () {
    st.open = {}; st.feature = null; render();
  });

  readHash();
  $('q').value = st.q;
  $('sort').value = st.sort + ':' + st.dir;
  compute();
  render();
  document.body.setAttribute('data-ready-ms', Math.round(performance.now()));  // time to tree
  document.body.setAttribute('data-ready', '1');  // the browser test waits for this
})();
