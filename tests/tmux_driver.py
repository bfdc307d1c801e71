"""Drive a program on a real terminal: tmux runs it in a detached pane, tests type into it and
read the screen. Each Terminal has its own tmux server (-L), so tests never share state."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

TMUX = shutil.which("tmux")


def need_tmux() -> None:
    if TMUX is None:
        pytest.skip("tmux is missing (apt-get install tmux)")


class Terminal:
    def __init__(self, argv: list, env: dict | None = None, width: int = 160, height: int = 50):
        need_tmux()
        self.socket = f"ggufile-test-{uuid.uuid4().hex[:10]}"
        # The program runs directly in the pane (no shell around it to catch Ctrl-C), and the pane
        # stays after it exits so its last screen and exit status can be read.
        config = Path(tempfile.mkdtemp(prefix="ggufile-tmux-")) / "tmux.conf"
        config.write_text("set -g remain-on-exit on\nset -g history-limit 20000\n")
        self.tmux("-f", str(config), "new-session", "-d", "-s", "t", "-x", str(width), "-y", str(height),
                  *map(str, argv), env=dict(os.environ if env is None else env, TERM="xterm-256color"))

    def tmux(self, *args, env: dict | None = None) -> str:
        return subprocess.run([TMUX, "-L", self.socket, *args], check=True, capture_output=True,
                              text=True, env=env).stdout

    def type(self, text: str, enter: bool = True) -> None:
        self.tmux("send-keys", "-t", "t", "-l", text)
        if enter:
            self.tmux("send-keys", "-t", "t", "Enter")

    def key(self, *names: str) -> None:
        self.tmux("send-keys", "-t", "t", *names)

    def paste(self, text: str) -> None:
        """Paste as a terminal does: bracketed (ESC[200~ ... ESC[201~) when the program asked for it."""
        self.tmux("set-buffer", "-b", "p", "--", text)
        self.tmux("paste-buffer", "-p", "-d", "-b", "p", "-t", "t")

    def screen(self) -> str:
        """Everything the terminal showed, scrollback included, wrapped lines joined."""
        return self.tmux("capture-pane", "-p", "-J", "-S", "-", "-t", "t")

    def wait_for(self, pattern: str, timeout: float = 180, count: int = 1) -> re.Match:
        """Wait until `pattern` (a regex) shows `count` times; returns the last match."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            found = list(re.finditer(pattern, text, re.M))
            if len(found) >= count:
                return found[count - 1]
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {pattern!r} x{count}; the screen:\n{text}")
            time.sleep(0.1)

    def exit_status(self) -> int | None:
        """The program's exit status once it has ended, else None."""
        fields = self.tmux("display-message", "-p", "-t", "t", "#{pane_pid} #{pane_dead} #{pane_dead_status}").split()
        if fields[1:2] == ["1"] and len(fields) > 2:
            return int(fields[2])
        # Under load tmux sometimes leaves an exited pane process unreaped for a long time (seen with
        # tmux 3.3a: the server idles in poll); the kernel already knows the exit code of the zombie.
        try:
            stat = Path(f"/proc/{fields[0]}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return int(stat[-1]) >> 8 if stat[0] == "Z" else None

    def wait_exit(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while (status := self.exit_status()) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"the program did not exit; the screen:\n{self.screen()}\n{self.threads()}")
            time.sleep(0.1)
        return status

    def threads(self) -> str:
        """Where the program's threads wait (kernel view), to tell a hang's cause."""
        pid = self.tmux("display-message", "-p", "-t", "t", "#{pane_pid}").strip()
        lines = []
        for task in sorted(Path(f"/proc/{pid}/task").glob("*")) if pid else []:
            try:
                lines.append(f"{task.name} {(task / 'wchan').read_text()} {(task / 'stat').read_text().split()[2]}")
            except OSError as err:
                lines.append(f"{task.name} ({err})")
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            lines.append(" ".join(ln for ln in status.splitlines() if ln.startswith(("State", "Threads", "PPid"))))
            ppid = next(ln.split()[1] for ln in status.splitlines() if ln.startswith("PPid"))
            parent = Path(f"/proc/{ppid}")
            lines.append(f"parent {ppid}: {(parent / 'cmdline').read_bytes().replace(bytes(1), b' ').decode()!r} "
                         f"state {(parent / 'stat').read_text().split()[2]} wchan {(parent / 'wchan').read_text()}")
        except OSError:
            pass
        return "threads: " + "; ".join(lines)

    def close(self) -> None:
        subprocess.run([TMUX, "-L", self.socket, "kill-server"], capture_output=True)

    def __enter__(self) -> "Terminal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
