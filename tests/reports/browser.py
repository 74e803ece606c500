"""Headless Chromium for the report's browser tests: the rendered DOM and a screenshot of a page
opened from the file system (Debian's `chromium`, installed by .ci/run)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

CANDIDATES = ('chromium', 'chromium-browser', 'google-chrome', 'google-chrome-stable')


def executable() -> str | None:
  """$CSAE_CHROMIUM, else the first Chromium on PATH; None when there is none."""
  env = os.environ.get('CSAE_CHROMIUM')
  if env:
    return env
  return next((p for p in map(shutil.which, CANDIDATES) if p), None)


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
  exe = executable()
  # its own profile per call: parallel test workers must not share one (Chromium locks it);
  # --no-sandbox because CI runs as root, where Chromium's sandbox refuses to start
  with tempfile.TemporaryDirectory() as profile:
    r = subprocess.run([exe, '--headless', '--no-sandbox', '--disable-gpu',
                        '--disable-dev-shm-usage', '--no-first-run', '--mute-audio',
                        f'--user-data-dir={profile}', *args],
                       capture_output=True, text=True, timeout=timeout)
  if r.returncode != 0:
    raise RuntimeError(f'{exe} {args} failed ({r.returncode}): {r.stderr[-2000:]}')
  return r


def url(path: str, fragment: str = '') -> str:
  return 'file://' + os.path.abspath(path) + (f'#{fragment}' if fragment else '')


def dump_dom(page_url: str, timeout: float = 90) -> str:
  """The DOM after the page's scripts ran (--dump-dom serialises it at the load event)."""
  return _run(['--virtual-time-budget=5000', '--dump-dom', page_url], timeout).stdout


def screenshot(page_url: str, out_png: str, size: tuple[int, int] = (1280, 1800),
               timeout: float = 90) -> str:
  _run(['--hide-scrollbars', f'--window-size={size[0]},{size[1]}', '--virtual-time-budget=5000',
        f'--screenshot={os.path.abspath(out_png)}', page_url], timeout)
  return out_png


def concepts_in(dom: str) -> dict[int, dict]:
  """concept id -> {'features': [member ids in order], 'open': bool, 'html': inner html} of
  every concept element in a dumped DOM (concepts do not nest)."""
  out = {}
  for attrs, inner in re.findall(r'<details([^>]*\bdata-concept-id="\d+"[^>]*)>(.*?)</details>',
                                 dom, re.S):
    cid = int(re.search(r'data-concept-id="(\d+)"', attrs).group(1))
    feats = [int(f) for f in re.findall(r'<li[^>]*\bdata-feature-id="(\d+)"', inner)]
    out[cid] = {'features': feats, 'open': bool(re.search(r'\bopen\b', attrs)), 'html': inner}
  return out
