"""`python -m benchmarks.launch RSS_FILE COMMAND...`: run COMMAND, write its peak RSS (bytes, with
the processes it waited for) to RSS_FILE, and exit with its status.

Linux hands a process the peak RSS of the process it was forked from when it calls exec, so a
command started straight from the benchmark's driver (which holds the generated fleet) would
report the driver's memory as its own. Started from this small process, it reports its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def main() -> None:
    rss_file, *command = sys.argv[1:]
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    Path(rss_file).write_text(str(usage.ru_maxrss))
    sys.exit(os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    main()
