"""
Record one run of one command for the results page: run it, keep the JSON line it prints last, and say when, where
and at which commit it ran.

    python experiments/record.py speed_small -- python experiments/benchmark.py --floor
    python experiments/record.py state_tracking_cpu --keep results/state_tracking_cpu.png -- \\
        python experiments/state_tracking.py --preset cpu --seeds 3

writes `experiments/results/<name>.json`:

    {"name": ..., "command": "python experiments/benchmark.py --floor", "started": "2026-12-02 14:05 UTC",
     "minutes": 12.5, "commit": "abc1234", "machine": {...}, "result": <the command's last JSON line>}

and copies the files named by `--keep` beside it, as `<name>.png`, `<name>.md`, ... (a JSON file as
`<name>.runs.json`). The command's whole output goes to `<name>.log` in the same
folder (not committed), so a run that failed or printed no JSON line leaves its log (and nothing else).
`results_page.py` builds the results page from these files.
"""

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List

from runs import commit

RESULTS = Path(__file__).resolve().parent / 'results'


def machine() -> Dict[str, Any]:
    """The CPU, its cores, and the versions the figures depend on."""
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                cpu = line.split(':', 1)[1].strip()
                break
    except OSError:
        pass
    return {'cpu': cpu, 'cores': os.cpu_count(), 'torch': torch.__version__,
            'python': platform.python_version(), 'cuda': torch.cuda.get_device_name() if torch.cuda.is_available()
            else None}


def uncommitted() -> bool:
    """Whether the library or the scripts differ from the commit (then the commit does not say what ran)."""
    status = subprocess.run(['git', 'status', '--porcelain', '--', 'labml_nn', 'experiments', ':!experiments/results'],
                            capture_output=True, text=True, cwd=RESULTS.parent.parent).stdout
    return bool(status.strip())


def last_json(output: str) -> Any:
    """The last line of `output` that is a JSON object."""
    for line in reversed(output.strip().splitlines()):
        line = line.strip()
        if line.startswith('{'):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise ValueError('the command printed no JSON line')


def kept_name(name: str, path: Path) -> str:
    """A kept file's name beside the record: `<name>.png`, `<name>.md`; a JSON file `<name>.runs.json`."""
    return f'{name}.runs.json' if path.suffix == '.json' else f'{name}{path.suffix}'


def main(argv: List[str]) -> int:
    if '--' not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    split = argv.index('--')
    parser = argparse.ArgumentParser(description='Record one run of one command for the results page')
    parser.add_argument('name', help='names the files experiments/results/<name>.json and .log')
    parser.add_argument('--keep', nargs='*', default=[], help='files the command writes, to copy beside the JSON')
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    RESULTS.mkdir(exist_ok=True)
    log = RESULTS / f'{args.name}.log'
    started = datetime.now(timezone.utc)
    start = time.perf_counter()
    with open(log, 'w') as out:
        process = subprocess.run(command, stdout=subprocess.PIPE, stderr=out, text=True)
        out.write(process.stdout)
    minutes = (time.perf_counter() - start) / 60
    if process.returncode != 0:
        print(f'the command failed (exit {process.returncode}); its output is in {log}', file=sys.stderr)
        return process.returncode
    record = {'name': args.name, 'command': shlex.join(command), 'started': started.strftime('%Y-%m-%d %H:%M UTC'),
              'minutes': round(minutes, 1), 'commit': commit(), 'uncommitted_changes': uncommitted(),
              'machine': machine(), 'result': last_json(process.stdout)}
    for path in map(Path, args.keep):
        shutil.copy(path, RESULTS / kept_name(args.name, path))
    (RESULTS / f'{args.name}.json').write_text(json.dumps(record, indent=1) + '\n')
    print(f'{RESULTS / args.name}.json ({minutes:.1f} min)')
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
