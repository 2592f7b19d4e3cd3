"""The machine under the benchmark: how busy its CPUs are, and a process's memory.

On a shared machine another job's threads fighting ours for the cores make
every figure junk, so the scripts say how busy the CPUs were.
"""

import os
import time


def cpu_busy_elsewhere(seconds=1.0):
    """Fraction of all CPUs busy over `seconds` (before we start anything): other
    people's jobs on this machine skew every figure, so the scripts warn about it."""
    def snapshot():
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:9]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle
    try:
        total0, idle0 = snapshot()
        time.sleep(seconds)
        total1, idle1 = snapshot()
    except OSError:
        return None
    total = total1 - total0
    return 1.0 - (idle1 - idle0) / total if total > 0 else None


def machine_note():
    """One line: cores, load average, and how busy the CPUs are right now."""
    busy = cpu_busy_elsewhere()
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    cores = os.cpu_count()
    line = f"machine: {cores} CPU cores, load average {load:.2f}, CPUs {100 * (busy or 0):.0f}% busy before start"
    if busy is not None and busy > 0.25:
        line += "  ** WARNING: other processes are using the CPU; figures will be low and noisy **"
    return line


def wait_for_quiet(max_wait, threshold=0.25):
    """Wait (up to max_wait s) until the CPUs are mostly idle: on a shared machine
    another job's threads fighting ours for 2 cores makes every figure junk."""
    if max_wait <= 0:
        return
    started = time.monotonic()
    told = False
    while True:
        busy = cpu_busy_elsewhere(2.0)
        if busy is None or busy < threshold:
            if told:
                print(f"  CPUs quiet after {time.monotonic() - started:.0f} s", flush=True)
            return
        if time.monotonic() - started > max_wait:
            print(f"  ** CPUs still {100 * busy:.0f}% busy after {max_wait} s: measuring anyway **", flush=True)
            return
        if not told:
            print(f"  waiting for other processes to leave the CPUs ({100 * busy:.0f}% busy) ...", flush=True)
            told = True


def _cpu_ticks():
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:9]]  # guest time is already in user
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields), sum(fields) - idle


def _process_ticks(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0


class CpuMeter:
    """How much of the machine's CPU others (not the server, not us) used meanwhile."""

    def __init__(self, pids):
        self.pids = list(pids)
        self.hz = os.sysconf("SC_CLK_TCK")
        self.start()

    def _mine(self):
        t = os.times()
        own = t.user + t.system + t.children_user + t.children_system  # children: waited-for subprocesses
        return sum(_process_ticks(pid) for pid in self.pids) + own * self.hz

    def start(self):
        self.total0, self.busy0 = _cpu_ticks()
        self.mine0 = self._mine()

    def others(self):
        """Fraction (0..1) of all CPU time used by other processes since start()."""
        total1, busy1 = _cpu_ticks()
        total = total1 - self.total0
        if total <= 0:
            return 0.0
        other = (busy1 - self.busy0) - (self._mine() - self.mine0)
        return max(0.0, other / total)


def read_status(pid):
    """{'VmRSS': kB, 'VmHWM': kB} of a process, from /proc (empty if it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


# A benchmark is many guests and replies from one address: the server's abuse
# limits (docs/configuration.md, "Abuse limits") would refuse it, and are not what is measured.
