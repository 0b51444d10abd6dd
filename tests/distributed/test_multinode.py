"""Two "nodes" on one machine, 1 CPU process each, EP=2 spanning them, ZeRO-3: the per-step losses equal those of the
same run on one node (`deepspeed --num_gpus 2`).

(a) DeepSpeed's own multi-node path: the validated launch execs `deepspeed.launcher.runner` with a hostfile of two
    names of this machine; the runner checks ssh, reads `.deepspeed_env` and runs `pdsh -w localhost,127.0.0.1 ...`.
    Stand-ins for pdsh and ssh (written here into tmp_path/bin, first on PATH) run each host's command on this
    machine the way pdsh's ssh module would: `%n` replaced by the host's index, in a fresh login-like environment, so
    a variable reaches the ranks only if the runner exported it.
(b) One launch per node (Kubernetes-style, no ssh): node 0 through the validated launch, node 1 through plain
    `deepspeed --hostfile H --no_ssh --node_rank 1 ...`, started side by side.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.distributed.launch import free_port
from tests.distributed.test_pretrain import PRETRAIN, REPO, TINY_YAML, train_records, write_corpus

pytestmark = pytest.mark.slow

HOSTS = ("localhost", "127.0.0.1")  # two names that reach this machine: two "nodes"
KEYS = ("loss", "lm_loss", "aux_loss", "grad_norm")
STEPS = 3
# The runner's `deepspeed` console script is `deepspeed.launcher.runner.main`; the module form picks this Python.
DEEPSPEED = [sys.executable, "-m", "deepspeed.launcher.runner"]
# What sshd gives a remote command: a login environment, none of the launching shell's variables.
LOGIN_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "TMPDIR")

PDSH = '''#!{python}
"""pdsh stand-in: `pdsh -S -f FANOUT -w H1,H2 CMD...` runs `ssh HOST CMD` for every host at once, with %n in CMD
replaced by the host's index in -w (pdsh's ssh module does the same), prefixes each output line with `HOST: ` and
exits with the largest exit status (-S)."""
import json, subprocess, sys, threading

args, hosts = sys.argv[1:], None
while args and args[0].startswith("-"):
    flag = args.pop(0)
    if flag in ("-f", "-w", "-l"):
        value = args.pop(0)
        hosts = value.split(",") if flag == "-w" else hosts
    elif flag != "-S":
        sys.exit(f"pdsh stand-in: unexpected option {{flag}}")
command = " ".join(args)  # pdsh joins its arguments into one remote command line
with open({log!r}, "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "hosts": hosts}}) + "\\n")
lock = threading.Lock()

def relay(host, proc):
    for line in proc.stdout:
        with lock:
            sys.stdout.write(f"{{host}}: {{line}}")
            sys.stdout.flush()

procs = [subprocess.Popen(["ssh", host, command.replace("%n", str(n))], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) for n, host in enumerate(hosts)]
threads = [threading.Thread(target=relay, args=(h, p)) for h, p in zip(hosts, procs)]
for t in threads:
    t.start()
for t in threads:
    t.join()
codes = [p.wait() for p in procs]
sys.exit(max(c if c >= 0 else 128 - c for c in codes))  # killed by signal S: 128+S, as a shell reports it
'''

SSH = '''#!{python}
"""ssh stand-in: `ssh [-o OPT] [-p PORT] HOST CMD...` runs CMD with `sh -c` on this machine, as sshd would on HOST,
in a login-like environment ({keep}); HOST must resolve to a loopback address."""
import json, os, shutil, socket, sys

args = sys.argv[1:]
while args and args[0] in ("-o", "-p"):
    args = args[2:]
host, command = args[0], " ".join(args[1:])
if not socket.gethostbyname(host).startswith("127."):
    sys.exit(f"ssh stand-in: {{host}} is not this machine")
with open({log!r}, "a") as f:
    f.write(json.dumps({{"host": host, "command": command}}) + "\\n")
env = {{k: os.environ[k] for k in {keep!r} if k in os.environ}}
os.execve(shutil.which("sh"), ["sh", "-c", command], env)
'''


def _overrides(corpus: str, out) -> list[str]:
    return [f"data.paths=[{corpus}]", f"train.max_steps={STEPS}", "train.log_steps=1", "train.save_at_end=false",
            "export.at_end=false", "parallel.ep_size=2", "parallel.zero_stage=3", f"train.output_dir={out}"]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "DS_ENV_FILE"):
        env.pop(key, None)
    return env


def _run_together(cmds: list[list[str]], logs: list, timeout: float = 300, **popen) -> list[int]:
    """Start `cmds` side by side, each in its own process group (a runner's launcher and ranks are its
    grandchildren); once one fails, give the others 15 s to fail too, then end every group still running."""
    procs = [subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True, **popen)
             for cmd, log in zip(cmds, logs)]
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                deadline = min(deadline, time.monotonic() + 15)
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for log in logs:
        log.seek(0)
    return [p.returncode for p in procs]


def _losses(out) -> list[tuple[float, ...]]:
    records = train_records(str(out))
    assert sorted(records) == list(range(1, STEPS + 1)), sorted(records)
    return [tuple(records[s][k] for k in KEYS) for s in sorted(records)]


def _assert_equal(got: list[tuple[float, ...]], want: list[tuple[float, ...]], name: str) -> None:
    print(f"\n{name}: step " + ", ".join(KEYS))
    for step, (g, w) in enumerate(zip(got, want), start=1):
        print(f"  {step}: {g}  single-node {w}")
        assert g == pytest.approx(w, rel=1e-5, abs=1e-9), (name, step)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return write_corpus(str(tmp_path_factory.mktemp("corpus") / "train.jsonl"), 300, 0)


@pytest.fixture(scope="module")
def single_node(tmp_path_factory, corpus) -> list[tuple[float, ...]]:
    folder = tmp_path_factory.mktemp("single")
    with open(folder / "launch.log", "w+") as log:
        (code,) = _run_together([DEEPSPEED + ["--num_gpus", "2", "--master_port", str(free_port()), PRETRAIN,
                                              "--config", TINY_YAML, *_overrides(corpus, folder / "out")]], [log],
                                env=_env(), cwd=REPO)
        assert code == 0, log.read()[-6000:]
    return _losses(folder / "out")


def _extensions_dir() -> str:
    """Where this session's other launches find DeepSpeed's JIT-built CPU ops. The pdsh ranks get an empty HOME, so
    without this they would rebuild the shm op (~30 s of C++) in a folder of their own."""
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        return os.environ["TORCH_EXTENSIONS_DIR"]
    from torch.utils.cpp_extension import _get_build_directory  # noqa: PLC0415

    # torch's default root plus its per-Python/accelerator subfolder, as a rank with the real HOME resolves it
    return os.path.dirname(_get_build_directory("deepspeed_shm_comm", verbose=False))


def _hostfile(tmp_path) -> str:
    path = tmp_path / "hostfile"
    path.write_text("".join(f"{h} slots=1\n" for h in HOSTS))
    return str(path)


def test_pdsh_runner_two_nodes_match_single_node(tmp_path, corpus, single_node):
    bin_dir, home, launch_dir = tmp_path / "bin", tmp_path / "home", tmp_path / "launch"
    for d in (bin_dir, home, launch_dir):
        d.mkdir()
    pdsh_log, ssh_log = tmp_path / "pdsh.log", tmp_path / "ssh.log"
    for name, text in (("pdsh", PDSH.format(python=sys.executable, log=str(pdsh_log))),
                       ("ssh", SSH.format(python=sys.executable, log=str(ssh_log), keep=LOGIN_ENV))):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    # The remote shells get nothing from this process's environment: what the ranks need comes from here.
    extensions = _extensions_dir()
    (launch_dir / ".deepspeed_env").write_text(f"OMP_NUM_THREADS=1\nTORCH_EXTENSIONS_DIR={extensions}\n"
                                               f"NCCL_DEBUG=WARN\n")
    out = tmp_path / "out"
    port = free_port()
    # The validated launch from a directory that is not the checkout: the runner reads ./.deepspeed_env there and
    # each node `cd`s to it; HOME is empty, so ~/.deepspeed_env of this machine plays no part.
    with open(tmp_path / "launch.log", "w+") as f:
        (code,) = _run_together([[sys.executable, PRETRAIN, "--hostfile", _hostfile(tmp_path), "--master_addr",
                                  "127.0.0.1", "--master_port", str(port), "--allow_cross_node_ep", "--config",
                                  TINY_YAML, *_overrides(corpus, out)]], [f], cwd=launch_dir,
                                env=_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", HOME=str(home)))
        log = f.read()
    assert code == 0, log[-6000:]

    (pdsh,) = [json.loads(line) for line in pdsh_log.read_text().splitlines()]
    assert pdsh["argv"][:5] == ["-S", "-f", "1024", "-w", ",".join(HOSTS)]
    command = " ".join(pdsh["argv"][5:])
    assert "export NCCL_DEBUG=WARN;" in command and "export OMP_NUM_THREADS=1;" in command
    assert f"cd {launch_dir};" in command and "-m deepspeed.launcher.launch" in command
    assert "--node_rank=%n" in command and f"--master_addr=127.0.0.1 --master_port={port}" in command
    assert "--allow_cross_node_ep" not in command and "--hostfile" not in command

    ssh = [json.loads(line) for line in ssh_log.read_text().splitlines()]
    assert ssh[0] == {"host": HOSTS[0], "command": "hostname"}  # the runner's passwordless-ssh check
    assert sorted((s["host"], s["command"]) for s in ssh[1:]) == \
        sorted((h, command.replace("%n", str(n))) for n, h in enumerate(HOSTS))
    for n, host in enumerate(HOSTS):
        node = [line for line in log.splitlines() if line.startswith(f"{host}: ")]
        # deepspeed.launcher.launch on that node: its node rank, and the exported variable in the environment it
        # hands to the rank it starts (it logs every variable whose name holds NCCL).
        assert any(f"nnodes=2, num_local_procs=1, node_rank={n}" in line for line in node), (host, log[-4000:])
        assert any(re.search(rf"\] {n} NCCL_DEBUG=WARN$", line) for line in node), (host, log[-4000:])
    _assert_equal(_losses(out), single_node, "pdsh, 2 nodes x 1 process")


def test_no_ssh_per_node_launches_match_single_node(tmp_path, corpus, single_node):
    hostfile, out, port = _hostfile(tmp_path), tmp_path / "out", free_port()
    common = ["--master_addr", "127.0.0.1", "--master_port", str(port)]
    node0 = [sys.executable, PRETRAIN, "--hostfile", hostfile, "--no_ssh", "--node_rank=0", *common,
             "--allow_cross_node_ep", "--config", TINY_YAML, *_overrides(corpus, out)]
    node1 = DEEPSPEED + ["--hostfile", hostfile, "--no_ssh", "--node_rank", "1", *common, PRETRAIN, "--config",
                         TINY_YAML, *_overrides(corpus, out)]
    with open(tmp_path / "node0.log", "w+") as log0, open(tmp_path / "node1.log", "w+") as log1:
        codes = _run_together([node0, node1], [log0, log1], env=_env(), cwd=REPO)
        text = [log0.read(), log1.read()]
    assert codes == [0, 0], "\n".join(t[-4000:] for t in text)
    assert "launching: " in text[0] and "--no_ssh --node_rank=0" in text[0]  # node 0 went through prelaunch
    for n in (0, 1):
        assert f"nnodes=2, num_local_procs=1, node_rank={n}" in text[n]
    _assert_equal(_losses(out), single_node, "--no_ssh, 2 per-node launches")


@pytest.mark.parametrize("extra,message,fix", [
    (["--node_rank=2", "--allow_cross_node_ep"], "error: --node_rank (2) must be in 0..1, one per node of 2 hosts x 1 "
                                                 "GPUs", "hostfile lines 1, 2"),
    (["--node_rank=1"], "error: parallel.ep_size (2) exceeds the 1 GPUs of one node", "pass --allow_cross_node_ep"),
])
def test_per_node_launch_bad_input_one_line_exit_2(tmp_path, corpus, extra, message, fix):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, PRETRAIN, "--hostfile", _hostfile(tmp_path), "--no_ssh",
                           "--master_addr=127.0.0.1", *extra, "--config", TINY_YAML, *_overrides(corpus, out)],
                          capture_output=True, text=True, timeout=120, env=_env(), cwd=REPO)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(message), errors
    assert fix in errors[0]
    assert "launching:" not in proc.stdout and not out.exists()
