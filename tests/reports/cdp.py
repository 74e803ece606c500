"""Drives headless Chromium through the DevTools protocol over a pipe (--remote-debugging-pipe:
fd 3 carries commands in, fd 4 replies out, NUL-separated JSON), so a test types into the search
box and clicks like a user, with no extra library and no port."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import signal
import subprocess
import tempfile
import time

from tests.reports import browser


def _high(fd: int) -> int:
  new = fcntl.fcntl(fd, fcntl.F_DUPFD, 20)
  os.close(fd)
  return new


class Page:
  """One tab. `js(expr)` evaluates in the page (promises awaited) and returns the value."""

  def __init__(self, timeout_s: float = 60):
    self._profile = tempfile.TemporaryDirectory()
    cmd_r, self._cmd_w = os.pipe()
    self._out_r, out_w = os.pipe()
    cmd_r, out_w = _high(cmd_r), _high(out_w)  # never 3 or 4 themselves

    # bash (dash takes one-digit fds only) moves the pipe ends to fds 3 and 4 and execs
    # Chromium (a preexec_fn would run Python in the forked child of a multithreaded process)
    args = [browser.executable(), '--headless', '--no-sandbox', '--disable-gpu',
            '--disable-dev-shm-usage', '--no-first-run', '--remote-debugging-pipe',
            f'--user-data-dir={self._profile.name}', 'about:blank']
    self._proc = subprocess.Popen(
        ['/bin/bash', '-c', f'exec "$@" 3<&{cmd_r} 4>&{out_w} {cmd_r}<&- {out_w}>&-', 'bash',
         *args],
        pass_fds=(cmd_r, out_w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)  # its own process group: close() kills its helpers too
    os.close(cmd_r)
    os.close(out_w)
    self._timeout_s, self._buf, self._id = timeout_s, b'', 0
    target = self._send('Target.createTarget', {'url': 'about:blank'})['targetId']
    self._session = self._send('Target.attachToTarget', {'targetId': target,
                                                         'flatten': True})['sessionId']

  def _send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
    self._id += 1
    msg = {'id': self._id, 'method': method, 'params': params or {}}
    if session:
      msg['sessionId'] = session
    os.write(self._cmd_w, json.dumps(msg).encode() + b'\0')
    while True:  # events and other replies are skipped
      while b'\0' not in self._buf:
        if not select.select([self._out_r], [], [], self._timeout_s)[0]:
          raise TimeoutError(f'Chromium did not answer {method} in {self._timeout_s} s')
        chunk = os.read(self._out_r, 1 << 16)
        if not chunk:
          raise RuntimeError(f'Chromium closed the DevTools pipe during {method}')
        self._buf += chunk
      line, self._buf = self._buf.split(b'\0', 1)
      reply = json.loads(line)
      if reply.get('id') == self._id:
        if 'error' in reply:
          raise RuntimeError(f'{method}: {reply["error"]}')
        return reply['result']

  def cmd(self, method: str, **params) -> dict:
    return self._send(method, params, self._session)

  def js(self, expr: str):
    r = self.cmd('Runtime.evaluate', expression=expr, awaitPromise=True, returnByValue=True)
    if 'exceptionDetails' in r:
      raise RuntimeError(f'{expr[:200]}: {r["exceptionDetails"]}')
    return r['result'].get('value')

  def wait_for(self, condition: str, timeout_ms: int = 10000):
    """Resolves when the JS expression is truthy (polled by the page itself, every frame)."""
    return self.js(f'''new Promise((ok, fail) => {{
      const t0 = performance.now();
      const poll = () => {{ let v; try {{ v = ({condition}); }} catch (e) {{}}
        if (v) ok(v); else if (performance.now() - t0 > {timeout_ms}) fail(new Error(
          'timed out waiting for ' + {json.dumps(condition)}));
        else requestAnimationFrame(poll); }};
      poll(); }})''')

  def open(self, url: str, size: tuple[int, int] = (1280, 1800)) -> None:
    self.cmd('Emulation.setDeviceMetricsOverride', width=size[0], height=size[1],
             deviceScaleFactor=1, mobile=False)
    self.cmd('Page.navigate', url='about:blank')  # a new hash alone would not reload the page
    self.wait_for('location.href === "about:blank"')
    self.cmd('Page.navigate', url=url)
    self.wait_for(f'location.href === {json.dumps(url)} && '
                  f'document.body && document.body.dataset.ready === "1"')

  def screenshot(self, path: str) -> str:
    data = self.cmd('Page.captureScreenshot', format='png')['data']
    with open(path, 'wb') as f:
      f.write(base64.b64decode(data))
    return path

  def close(self) -> None:
    # Killing only the browser process left its renderer / utility children writing into the
    # profile while it was deleted (`Directory not empty: 'Default'`, seen once in a full run).
    try:
      os.killpg(self._proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    self._proc.wait()
    os.close(self._cmd_w)
    os.close(self._out_r)
    for attempt in range(20):  # the killed group's last writes may still land for a moment
      try:
        self._profile.cleanup()
        break
      except OSError:
        if attempt == 19:
          raise
        time.sleep(0.1)
