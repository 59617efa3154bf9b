"""A real single-node Slurm (Debian's slurm-wlm 22.05 and munge) runs a small grid through submit.sh: same-stage
inputs in one submission, a failed cell and what it blocks, the fix refused then archived and rerun, queued
cells left out of a second submission, and an sbatch refused mid-chain. Tier ``slurm`` (``make test-slurm``,
which installs the packages); skipped where ``slurmctld`` is not installed. The daemons run as root on
loopback only, on free ports, with their state in the test's temporary directory, and are stopped after."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slurm,
              pytest.mark.skipif(not shutil.which("slurmctld"), reason="slurmctld not installed (make test-slurm)")]

REPO = Path(__file__).resolve().parents[1]
NB = "tests/notebooks/square.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _until(what: str, check, timeout: float, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(poll)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """slurmctld + slurmd (one node, 2 CPUs, cons_tres, linuxproc, no accounting) and munged if none runs;
    yields the environment the client commands need (SLURM_CONF)."""
    if os.geteuid() != 0:
        pytest.skip("the Slurm daemons are started as root")
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (d / sub).mkdir()
    conf = d / "slurm.conf"
    conf.write_text(f"""ClusterName=cdtest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
AuthType=auth/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    procs = []
    if subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:  # no munged answering: start one
        Path("/run/munge").mkdir(exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        procs.append(subprocess.Popen(["runuser", "-u", "munge", "--", "munged", "-F"]))
        _until("munged", lambda: subprocess.run(["munge", "-n"], capture_output=True).returncode == 0, 30)
    procs.append(subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(conf)], env=env))
    procs.append(subprocess.Popen(["slurmd", "-D", "-N", "localhost", "-f", str(conf)], env=env))
    try:
        _until("the node to be idle", lambda: "idle" in subprocess.run(
            ["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout, 60)
        yield env
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def _grid(tmp_path: Path, bad_fails: bool) -> Path:
    """parent/{ok,bad}; child/p reads parent/ok, child/q reads child/p (the same stage), child/r parent/bad."""
    spec = {"name": "sl", "output_root": str(tmp_path / "out"), "slurm": {"cpus": 1, "mem": "500M", "time": "00:10:00"},
            "axes": {"x": {"ok": {"all": {"x": 2}}, "bad": {"all": {"x": 5, "fail": bad_fails}}},
                     "y": {"p": {"child": {"inputs": {"upstream": "parent/ok"}}},
                           "q": {"child": {"inputs": {"upstream": "child/p"}}},
                           "r": {"child": {"inputs": {"upstream": "parent/bad"}}}}},
            "stages": {"parent": {"notebook": NB, "axes": ["x"]},
                       "child": {"notebook": NB, "axes": ["y"], "after": "inputs"}}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _cli(env, *args, check=True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "cdlib.grid", *args], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert not check or out.returncode == 0, out.stdout + out.stderr
    return out


def _submit(env, grid_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(grid_dir / "slurm/submit.sh")], env=env, capture_output=True, text=True,
                          timeout=120)


def _drain(env, timeout: float = 300) -> None:
    _until("the queue to empty", lambda: subprocess.run(["squeue", "-h"], env=env, capture_output=True,
                                                        text=True).stdout.strip() == "", timeout, poll=1.0)


def _statuses(env, grid: Path) -> dict[str, tuple[str, str]]:
    from cdlib.grid import Grid
    from cdlib.grid.status import status_table

    os.environ["SLURM_CONF"] = env["SLURM_CONF"]  # status_table asks squeue, in this process
    table = status_table(Grid(grid, root=REPO))
    return {r["cell"]: (r["status"], r["slurm"]) for r in table.iter_rows(named=True)}


def test_a_grid_through_submit_sh_with_a_failure_a_fix_and_a_rerun(cluster, tmp_path):
    env = {**cluster, "HF_HUB_OFFLINE": "1"}
    grid = _grid(tmp_path, bad_fails=True)
    grid_dir = tmp_path / "out/sl"
    _cli(env, "slurm", str(grid))
    assert (grid_dir / "slurm/child.wave2.cells").read_text().split() == ["child/q"], "child/q waits for child/p"
    sub = _submit(env, grid_dir)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    lines = sub.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:3]] == ["parent", "child.wave1", "child.wave2"], sub.stdout
    # submitted again while the first round is queued: nothing doubles, it says which cells Slurm holds
    again = _cli(env, "slurm", str(grid))
    assert "child/q: queued or running in Slurm (job" in again.stdout, again.stdout
    _drain(env)
    st = _statuses(env, grid)
    assert st["parent/ok"][0] == st["child/p"][0] == st["child/q"][0] == "done", st
    assert st["parent/bad"][0] == "failed" and st["child/r"][0] == "blocked", st
    assert "_" in st["child/q"][1], "the manifest names the array job and task"
    logs = grid_dir / "slurm/logs"
    assert len(list((logs / "child").glob("q.*_*.out"))) == 1 and list((logs / "parent").glob("bad.*.out"))
    # the fix: parent/bad no longer fails; its directory's params differ, so it is refused until archived
    grid = _grid(tmp_path, bad_fails=False)
    said = _cli(env, "slurm", str(grid)).stdout
    assert "parent/bad: would be REFUSED" in said and "child/r: left out" in said, said
    said = _cli(env, "slurm", str(grid), "--archive-conflicts").stdout
    assert "parent/bad: its directory's params differ from the grid's; moved to" in said, said
    assert list((grid_dir / "parent").glob("bad.archived-*")), "the refused directory is kept aside"
    assert (grid_dir / "slurm/parent.cells").read_text().split() == ["parent/bad"]
    assert _submit(env, grid_dir).returncode == 0
    _drain(env)
    assert {s for s, _ in _statuses(env, grid).values()} == {"done"}
    assert len(list((logs / "parent").glob("bad.*.out"))) == 2, "each attempt keeps its own log"


def test_an_sbatch_refused_mid_chain_names_the_stage_and_how_to_cancel(cluster, tmp_path):
    grid = _grid(tmp_path, bad_fails=False)
    spec = yaml.safe_load(grid.read_text())
    spec["stages"]["child"]["slurm"] = {"mem": "64G"}  # more than the node has
    grid.write_text(yaml.safe_dump(spec, sort_keys=False))
    _cli(cluster, "slurm", str(grid))
    sub = _submit(cluster, tmp_path / "out/sl")
    assert sub.returncode != 0
    assert sub.stdout.startswith("parent: job "), sub.stdout
    queued = sub.stdout.split()[2]
    assert "sbatch failed for stage child.wave1" in sub.stderr and f"scancel {queued}" in sub.stderr, sub.stderr
    subprocess.run(["scancel", queued], env=cluster, check=True)
    _drain(cluster, 60)
