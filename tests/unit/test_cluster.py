"""framework/cluster: hostfile errors with line numbers, host selection and the node-level expert-parallel layout, the
runner option mapping and the re-launch command, `.deepspeed_env` checks; DeepSpeed 0.19.8's own parser as the
reference. The config's checks against the world size (batch, ep_size vs processes / experts) are in test_plan.py."""

from __future__ import annotations

import argparse
import os
import re
import sys

import pytest
from deepspeed.launcher import runner as ds_runner

from framework.cluster import (OPTIONS, PRELAUNCH_OPTIONS, REJECTED, check_deepspeed_env, check_world,
                               deepspeed_env_files, is_under_launcher, parse_hostfile, prelaunch, runner_command,
                               select_gpus, split_launcher_args, wants_prelaunch)

GOOD = """# two 8-GPU nodes

node-a slots=8
\tnode-b\tslots=8   # trailing text is ignored, as DeepSpeed does
  # indented comment
"""
LAUNCH_ENV = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")


@pytest.fixture
def write(tmp_path):
    def write(text: str, name: str = "hostfile") -> str:
        path = tmp_path / name
        path.write_text(text)
        return str(path)
    return write


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    """Not under a launcher; no .deepspeed_env in HOME or the current directory."""
    for name in LAUNCH_ENV + ("DS_ENV_FILE",):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    return home


# ---------------------------------------------------------------- hostfile grammar


def test_good_hostfile_with_comments(write):
    hosts = parse_hostfile(write(GOOD))
    assert list(hosts.items()) == [("node-a", 8), ("node-b", 8)]
    assert hosts.line_of == {"node-a": 3, "node-b": 4}
    assert isinstance(hosts, dict)


@pytest.mark.parametrize("text", [GOOD, "a slots=1\n", "a slots=4 max_slots=4\nb slots=2", "a slots=08\n"])
def test_accepts_what_deepspeed_accepts(write, text):
    assert dict(parse_hostfile(write(text))) == dict(ds_runner._parse_hostfile(text.splitlines(keepends=True)))


@pytest.mark.parametrize("body,line,pattern", [
    ("node-c\n", 3, r"bad hostfile line 'node-c': expected 'HOST slots=N'"),
    ("node-c slots = 8\n", 3, r"bad hostfile line 'node-c slots = 8'"),
    ("slots=8\n", 3, r"bad hostfile line 'slots=8'"),
    ("node-c 8\n", 3, r"bad hostfile line 'node-c 8'"),
    ("node-c:8\n", 3, r"bad hostfile line 'node-c:8'"),
    ("node-c SLOTS=8\n", 3, r"bad hostfile line 'node-c SLOTS=8'"),
    ("node-c slots=-1\n", 3, r"slots must be a positive integer, found 'slots=-1' in 'node-c slots=-1'"),
    ("node-c slots=\n", 3, r"slots must be a positive integer, found 'slots=' in 'node-c slots='"),
    ("node-c slots=0\n", 3, r"slots must be a positive integer, found 'slots=0'"),  # DeepSpeed takes 0
    ("node-c slots=8x\n", 3, r"slots must be a positive integer, found 'slots=8x'"),  # DeepSpeed reads 8
    ("\n# note\nnode-a slots=4\n", 5, r"host 'node-a' is listed twice \('node-a slots=4'; first on line 2: "
                                      r"'node-a slots=8'\)"),
])
def test_bad_line_names_path_line_and_text(write, body, line, pattern):
    path = write("# header\nnode-a slots=8\n" + body)
    with pytest.raises(ValueError, match=rf"^{re.escape(path)}:{line}: {pattern}") as info:
        parse_hostfile(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("body", ["node-c\n", "node-c slots = 8\n", "slots=8\n", "\n# note\nnode-a slots=4\n"])
def test_deepspeed_rejects_these_too(body):
    with pytest.raises(ValueError):
        ds_runner._parse_hostfile(("# header\nnode-a slots=8\n" + body).splitlines(keepends=True))


@pytest.mark.parametrize("text", ["", "\n\n", "# only comments\n  # and more\n"])
def test_empty_hostfile(write, text):
    path = write(text)
    with pytest.raises(ValueError, match=rf"^{re.escape(path)}: hostfile lists no hosts"):
        parse_hostfile(path)


def test_missing_hostfile_and_directory(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=rf"^{re.escape(missing)}: hostfile not found \(DeepSpeed would warn"):
        parse_hostfile(missing)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path))}: is a directory"):
        parse_hostfile(str(tmp_path))


# ---------------------------------------------------------------- world size


def test_world_size_arithmetic(write):
    hosts = parse_hostfile(write("a slots=8\nb slots=8\nc slots=4\n"))
    assert check_world(hosts, None, None, 1, "h") == 20
    assert check_world(hosts, None, 2, 8, "h") == 16
    assert check_world(hosts, 4, None, 4, "h") == 12
    assert check_world(hosts, 2, 1, 2, "h") == 2
    assert check_world({"x": 2}, None, None, 2, "plain") == 2


@pytest.mark.parametrize("num_nodes,num_gpus", [(None, None), (1, None), (2, 4), (None, 2), (3, 4)])
def test_selection_matches_deepspeed(num_nodes, num_gpus):
    hosts = {"a": 8, "b": 4, "c": 4}
    errors = []
    mine = select_gpus(hosts, num_gpus, num_nodes, "h", errors)
    pool = {h: list(range(n)) for h, n in hosts.items()}
    theirs = ds_runner.apply_num_nodes_and_gpus(pool, num_nodes or -1, num_gpus or -1)
    assert mine == {h: len(slots) for h, slots in theirs.items()} and not errors


def test_num_gpus_and_num_nodes_beyond_the_hostfile(write):
    path = write("a slots=8\n# gap\nb slots=4\n")
    hosts = parse_hostfile(path)
    with pytest.raises(ValueError, match=rf"--num_gpus \(8\) exceeds slots=4 of {re.escape(path)}:3 'b slots=4'"):
        check_world(hosts, 8, None, 1, path)
    with pytest.raises(ValueError, match=rf"--num_nodes \(3\) exceeds the 2 host\(s\) in {re.escape(path)} lines 1, 3"):
        check_world(hosts, None, 3, 1, path)


def test_ep_size_larger_than_a_node(write):
    path = write("a slots=8\nb slots=8\n")
    with pytest.raises(ValueError, match=rf"^parallel.ep_size \(16\) exceeds the 8 GPUs of one node "
                                         rf"\({re.escape(path)}:1 'a slots=8'\); .* set parallel.ep_size to one of "
                                         rf"\[1, 2, 4, 8\] \(or pass --allow_cross_node_ep to let "
                                         rf"expert-parallel groups span nodes\)$"):
        check_world(parse_hostfile(path), None, None, 16, path)


def test_ep_size_must_divide_a_node(write):
    path = write("a slots=6\nb slots=6\n")
    with pytest.raises(ValueError, match=r"^parallel.ep_size \(4\) must divide the 6 GPUs per node .* "
                                         r"choose one of \[1, 2, 3, 6\] \(or pass --allow_cross_node_ep .*\)$"):
        check_world(parse_hostfile(path), None, None, 4, path)


def test_ep_across_nodes_on_request(write):
    """The opt-in lifts the one-node limit (that EP groups tile the world is the plan's check, test_plan.py)."""
    path = write("a slots=6\nb slots=6\nc slots=4\n")
    hosts = parse_hostfile(path)
    assert check_world(hosts, None, None, 16, path, ep_across_nodes=True) == 16
    assert check_world(hosts, 1, 2, 2, path, ep_across_nodes=True) == 2  # 2 nodes x 1 process, EP=2
    with pytest.raises(ValueError, match=r"^parallel.ep_size \(2\) exceeds the 1 GPUs of one node"):
        check_world(hosts, 1, 2, 2, path)


def test_ep_needs_equal_nodes(write):
    path = write("a slots=8\nb slots=8\nc slots=4\n")
    hosts = parse_hostfile(path)
    with pytest.raises(ValueError, match=rf"^parallel.ep_size \(2\) > 1 needs the same GPU count on every node, but "
                                         rf"{re.escape(path)}:1 'a slots=8' has 8 and {re.escape(path)}:3 "
                                         rf"'c slots=4' has 4;"):
        check_world(hosts, None, None, 2, path)
    assert check_world(hosts, None, None, 1, path) == 20  # fine without EP
    assert check_world(hosts, 4, None, 2, path) == 12  # --num_gpus evens the nodes


def test_all_errors_together():
    """Every host-selection and node-layout problem in one error, one line each."""
    with pytest.raises(ValueError) as info:
        check_world({"a": 8, "b": 4}, 6, 3, 4, "h")
    lines = str(info.value).splitlines()
    assert [line.split(" ")[0] for line in lines] == ["--num_nodes", "--num_gpus", "parallel.ep_size"]
    assert "h ('b slots=4')" in lines[1]  # a plain mapping: the source without line numbers
    assert lines[2].startswith("parallel.ep_size (4) must divide the 6 GPUs per node (h ('a slots=8'))")


# ---------------------------------------------------------------- command line


def _deepspeed_runner_parser(monkeypatch) -> argparse.ArgumentParser:
    seen = []
    parse = argparse.ArgumentParser.parse_args
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", lambda self, *a, **k: seen.append(self) or
                        parse(self, *a, **k))
    ds_runner.parse_args(["x.py"])
    return seen[0]


def test_option_table_matches_deepspeed_runner(monkeypatch):
    actions = _deepspeed_runner_parser(monkeypatch)._option_string_actions
    for name in REJECTED:
        assert name in actions, name
    for opt in PRELAUNCH_OPTIONS:  # ours: must never shadow a runner option
        assert not set(opt.names) & set(actions), opt
    for opt in OPTIONS:
        for name in opt.names:  # every spelling is the runner's, for the same option
            assert actions[name] is actions[opt.runner], name
        action = actions[opt.runner]
        kind = "flag" if action.nargs == 0 else "int" if action.type is int else "str"
        assert opt.kind == kind, opt


def test_split_launcher_args():
    argv = ["-H", "hf", "--config", "c.yaml", "--num_gpus=4", "train.lr=1e-4", "--master_port", "29600",
            "--no_ssh_check", "--launcher", "SLURM", "--launcher_args=--mca x y", "--num_accelerators_not", "z",
            "--", "--num_nodes", "2"]
    opts, rest = split_launcher_args(argv)
    assert opts == {"--hostfile": "hf", "--num_gpus": 4, "--master_port": 29600, "--no_ssh_check": True,
                    "--launcher": "SLURM", "--launcher_args": "--mca x y"}
    assert rest == ["--config", "c.yaml", "train.lr=1e-4", "--num_accelerators_not", "z", "--", "--num_nodes", "2"]
    assert split_launcher_args(["--num_accelerators", "2"])[0] == {"--num_gpus": 2}


@pytest.mark.parametrize("argv,pattern", [
    (["--include", "a:0"], r"^--include is not supported by the validated launch .*edit.* the hostfile"),
    (["-e=a"], r"^-e is not supported"),
    (["--module"], r"^--module is not supported .*the script is launch/pretrain.py$"),
    (["--node_rank", "one"], r"^--node_rank expects an integer, found 'one'$"),
    (["--allow_cross_node_ep=yes"], r"^--allow_cross_node_ep takes no value"),
    (["--num_gpus", "four"], r"^--num_gpus expects an integer, found 'four'$"),
    (["--master_addr"], r"^--master_addr expects a value$"),
    (["--force_multi=1"], r"^--force_multi takes no value"),
    (["--num_gpus", "2", "--num_accelerators=4"], r"^--num_accelerators is given twice$"),
])
def test_split_launcher_args_errors(argv, pattern):
    with pytest.raises(ValueError, match=pattern):
        split_launcher_args(argv)


def test_runner_command_parses_back_in_deepspeed():
    opts = {"--hostfile": "hf", "--num_nodes": 2, "--num_gpus": 4, "--master_addr": "node-a", "--master_port": 29600,
            "--launcher": "slurm", "--launcher_args": "-x FOO", "--force_multi": True}
    cmd = runner_command("launch/pretrain.py", opts, ["--config", "c.yaml", "--local_rank_like", "train.lr=1"])
    assert cmd[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"]
    assert cmd[3:] == ["--hostfile=hf", "--num_nodes=2", "--num_gpus=4", "--master_addr=node-a",
                       "--master_port=29600", "--launcher=slurm", "--launcher_args=-x FOO", "--force_multi",
                       "launch/pretrain.py", "--config", "c.yaml", "--local_rank_like", "train.lr=1"]
    args = ds_runner.parse_args(cmd[3:])
    assert (args.hostfile, args.num_nodes, args.num_gpus, args.master_addr, args.master_port) == \
        ("hf", 2, 4, "node-a", 29600)
    assert (args.launcher, args.launcher_args, args.force_multi) == ("slurm", "-x FOO", True)
    assert args.user_script == "launch/pretrain.py"
    assert args.user_args == ["--config", "c.yaml", "--local_rank_like", "train.lr=1"]


# ---------------------------------------------------------------- prelaunch


def test_prelaunch_command(write, clean_env):
    path = write(GOOD)
    argv = ["launch/pretrain.py", "--config", "c.yaml", "--hostfile", path, "--master_addr", "node-a",
            "--num_gpus", "4", "train.lr=1e-4"]
    assert wants_prelaunch(argv)
    cmd = prelaunch(argv, ep_size=4)
    assert cmd == [sys.executable, "-m", "deepspeed.launcher.runner", f"--hostfile={path}", "--num_gpus=4",
                   "--master_addr=node-a", "launch/pretrain.py", "--config", "c.yaml", "train.lr=1e-4"]


def test_prelaunch_collects_every_error(write, clean_env):
    path = write("a slots=8\nb slots=4\n")
    argv = ["p.py", f"--hostfile={path}", "--launcher", "openmpi", "--num_nodes", "2", "--master_port", "0"]
    with pytest.raises(ValueError) as info:
        prelaunch(argv, ep_size=2)
    lines = str(info.value).splitlines()
    assert lines[0].startswith("--launcher openmpi always uses every slot of the hostfile")
    assert lines[1] == "--master_port (0) must be in 1..65535"
    assert lines[2].startswith("parallel.ep_size (2) > 1 needs the same GPU count on every node")
    assert len(lines) == 3


def test_prelaunch_slurm_needs_even_hosts(write, clean_env):
    path = write("a slots=8\nb slots=4\n")
    with pytest.raises(ValueError, match=rf"^--launcher slurm needs the same GPU count on every host, found "
                                         rf"a:8, b:4 GPUs, {re.escape(path)} lines 1, 2$"):
        prelaunch(["p.py", "-H", path, "--launcher=slurm"], 1)
    assert prelaunch(["p.py", "-H", path, "--launcher=slurm", "--num_gpus=4"], 1)[-1] == "p.py"


def test_prelaunch_file_errors(tmp_path, write, clean_env):
    with pytest.raises(ValueError, match=r"needs --hostfile H"):
        prelaunch(["p.py", "--config", "c.yaml"], 1)
    with pytest.raises(FileNotFoundError, match="hostfile not found"):
        prelaunch(["p.py", "--hostfile", str(tmp_path / "missing")], 1)
    path = write("a slots=8\nb\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(path)}:2: bad hostfile line 'b'"):
        prelaunch(["p.py", "--hostfile", path], 1)


def test_prelaunch_checks_deepspeed_env_on_multi_node(write, clean_env, monkeypatch):
    hostfile = write(GOOD)
    (clean_env / ".deepspeed_env").write_text("NCCL_DEBUG=WARN\n\nNCCL_IB_HCA=mlx5\n")
    env_file = str(clean_env / ".deepspeed_env")
    with pytest.raises(ValueError, match=rf"^{re.escape(env_file)}:2: DeepSpeed's runner reads every line as "
                                         rf"KEY=VALUE .*found ''; keep only KEY=VALUE lines"):
        prelaunch(["p.py", "--hostfile", hostfile], 1)
    one_host = write("localhost slots=2\n", "one")
    assert prelaunch(["p.py", "--hostfile", one_host], 1)[-1] == "p.py"  # the runner ignores it here
    with pytest.raises(ValueError, match=r"\.deepspeed_env:2"):
        prelaunch(["p.py", "--hostfile", one_host, "--force_multi"], 1)


def test_prelaunch_warns_on_one_remote_host(write, clean_env, capsys):
    path = write("gpu-node-7 slots=2\n")
    prelaunch(["p.py", "--hostfile", path], 1)
    assert "DeepSpeed then starts every rank on this machine" in capsys.readouterr().err
    prelaunch(["p.py", "--hostfile", path, "--force_multi"], 1)
    assert capsys.readouterr().err == ""


def test_prelaunch_no_ssh_command_parses_back_in_deepspeed(write, clean_env, capsys):
    """One launch per node: the runner gets --no_ssh --node_rank=K; the EP opt-in stays here."""
    path = write(GOOD)
    argv = ["p.py", "--hostfile", path, "--no_ssh", "--node_rank=1", "--master_addr", "10.0.0.5", "--master_port",
            "29600", "--allow_cross_node_ep", "--config", "c.yaml"]
    cmd = prelaunch(argv, ep_size=16)
    assert cmd[3:] == [f"--hostfile={path}", "--master_addr=10.0.0.5", "--master_port=29600", "--no_ssh",
                       "--node_rank=1", "p.py", "--config", "c.yaml"]
    args = ds_runner.parse_args(cmd[3:])
    assert (args.no_ssh, args.node_rank, args.master_addr, args.user_args) == (True, 1, "10.0.0.5", ["--config",
                                                                                                     "c.yaml"])
    assert capsys.readouterr().err == ""
    (clean_env / ".deepspeed_env").write_text("NCCL_DEBUG=WARN\n\n")  # not read under --no_ssh: a warning, no check
    prelaunch(argv, ep_size=16)
    assert "with --no_ssh DeepSpeed's runner does not export " + str(clean_env / ".deepspeed_env") in \
        capsys.readouterr().err


@pytest.mark.parametrize("extra,pattern", [
    (["--no_ssh", "--master_addr=a"], r"^--no_ssh needs --node_rank K, this node's place among the hostfile's nodes "
                                      r"\(2 hosts x 8 GPUs, .* lines 3, 4\): 0..1, a different K on each node$"),
    (["--no_ssh", "--node_rank=2", "--master_addr=a"], r"^--node_rank \(2\) must be in 0..1, one per node of 2 hosts"),
    (["--no_ssh", "--node_rank=1", "--master_addr=a", "--num_nodes=1"], r"^--node_rank \(1\) must be in 0..0, one "
                                                                        r"per node of 1 host x 8 GPUs"),
    (["--no_ssh", "--node_rank=-1", "--master_addr=a"], r"^--node_rank \(-1\) must be in 0..1"),
    (["--no_ssh", "--node_rank=0"], r"^--no_ssh needs --master_addr: the address of node rank 0 \('node-a'\) that "
                                    r"every node can reach, .*`ssh node-a hostname -I`\)$"),
    (["--node_rank=0"], r"^--node_rank is read only with --no_ssh \(pdsh numbers the nodes itself\); add --no_ssh"),
    (["--no_ssh", "--node_rank=0", "--master_addr=a", "--ssh_port=22", "--launcher=openmpi"],
     r"^--ssh_port, --launcher have no effect with --no_ssh .*; drop them$"),
])
def test_prelaunch_no_ssh_errors(write, clean_env, extra, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        prelaunch(["p.py", "--hostfile", write(GOOD), *extra], 1)
    assert len(str(info.value).splitlines()) == 1


def test_prelaunch_ep_across_nodes_opt_in(write, clean_env):
    """2 nodes x 1 process with EP=2: refused by default, with the opt-in named; accepted with it."""
    path = write("localhost slots=1\n127.0.0.1 slots=1\n")
    with pytest.raises(ValueError, match=r"^parallel.ep_size \(2\) exceeds the 1 GPUs of one node .*\(or pass "
                                         r"--allow_cross_node_ep to let expert-parallel groups span nodes\)$"):
        prelaunch(["p.py", "--hostfile", path, "--master_addr=127.0.0.1"], 2)
    cmd = prelaunch(["p.py", "--hostfile", path, "--allow_cross_node_ep", "--master_addr=127.0.0.1"], 2)
    assert "--allow_cross_node_ep" not in cmd and cmd[-1] == "p.py"


def test_under_launcher(clean_env, monkeypatch):
    argv = ["p.py", "--hostfile", "h"]
    assert not is_under_launcher() and wants_prelaunch(argv)
    assert not wants_prelaunch(["p.py", "--config", "c.yaml"])
    assert wants_prelaunch(["p.py", "-H=h"])
    for name in LAUNCH_ENV:
        assert is_under_launcher({name: "0"})
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert is_under_launcher() and not wants_prelaunch(argv)
    with pytest.raises(RuntimeError, match="not inside a launched process"):
        prelaunch(argv, 1)


# ---------------------------------------------------------------- .deepspeed_env


def test_deepspeed_env_files_and_lines(tmp_path, clean_env, monkeypatch):
    assert deepspeed_env_files() == []
    (clean_env / ".deepspeed_env").write_text("A=1\n")
    (tmp_path / ".deepspeed_env").write_text("NCCL_SOCKET_IFNAME=^lo,docker\nB = x=y")
    home_file, cwd_file = deepspeed_env_files()
    assert os.path.samefile(home_file, clean_env / ".deepspeed_env")
    assert check_deepspeed_env(cwd_file) == {"NCCL_SOCKET_IFNAME": "^lo,docker", "B": "x=y"}
    monkeypatch.setenv("DS_ENV_FILE", "other_env")
    assert deepspeed_env_files() == []
    bad = tmp_path / "bad"
    bad.write_text("A=1\n# NCCL_DEBUG=INFO\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(bad))}:2: '# NCCL_DEBUG' is not an environment variable"):
        check_deepspeed_env(str(bad))
    bad.write_text("export A=1\n")
    with pytest.raises(ValueError, match=r":1: 'export A' is not an environment variable name"):
        check_deepspeed_env(str(bad))


def test_deepspeed_env_example_filtered_as_documented(tmp_path):
    example = os.path.join(os.path.dirname(__file__), "..", "..", "launch", "deepspeed_env.example")
    with pytest.raises(ValueError, match=r"deepspeed_env.example:1: "):  # as it is, the runner would choke on it
        check_deepspeed_env(example)
    with open(example) as f:  # grep -Ev '^[[:space:]]*(#|$)'
        kept = [line for line in f if not re.match(r"^\s*(#|$)", line)]
    filtered = tmp_path / ".deepspeed_env"
    filtered.write_text("".join(kept))
    exports = check_deepspeed_env(str(filtered))
    assert exports["NCCL_DEBUG"] == "WARN" and all(k.isupper() for k in exports)
