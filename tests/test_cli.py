"""The command line: every bad input is one line naming the file, field and value, a non-zero exit,
and no traceback. Most run in-process through ``cli.main`` (the same path as ``python -m dejavu_py``);
a few through real subprocesses, one of them under torchrun."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from e2e import ROOT, dejavu, torchrun, write_requests
from make_checkpoint import make_checkpoint
from safetensors.torch import load_file, save_file

from dejavu_py import cli
from dejavu_py.coordinator.journal import Journal, fingerprint
from dejavu_py.errors import UserError
from dejavu_py.runtime.prepare import check_run_dir


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "olmoe", family="olmoe", seed=1)


@pytest.fixture
def reqs(tmp_path) -> Path:
    return write_requests(tmp_path / "req.jsonl", [{"id": "a", "input_ids": [5, 6, 7], "max_new_tokens": 2}])


def copy_ckpt(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def run_main(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()  # drop what fixtures printed
    code = cli.main(list(argv))
    err = capsys.readouterr().err
    return code, err


def one_line_error(code: int, err: str, *needles: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


def base(ckpt: Path, reqs: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["--model", str(ckpt), "--prompts", str(reqs), "--run-dir", str(tmp_path / "run"), *extra]


# ---- flags and config file ------------------------------------------------------------------------


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for action in cli.build_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 15, action.dest
            assert action.option_strings[0] in out


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--max-batch-size", "-3"], ["--max-batch-size", "-3", "positive"]),
        (["--kv-capacity-tokens", "4", "--block-size", "8"], ["--kv-capacity-tokens 4", "block"]),
        (["--bogus", "1"], ["--bogus"]),
        (["--dtype", "int8"], ["--dtype", "int8"]),
        (["--layers-per-stage", "2,x"], ["--layers-per-stage", "2,x"]),
        (["--seed", "-1"], ["--seed -1"]),
        (["--replica-shm-dir", "/no/such/dir"], ["--replica-shm-dir", "/no/such/dir", "auto or off"]),
    ],
)
def test_bad_flag(capsys, ckpt, reqs, tmp_path, extra, needles):
    one_line_error(*run_main(capsys, *base(ckpt, reqs, tmp_path, *extra)), *needles)


def test_missing_required_flag(capsys, reqs):
    one_line_error(*run_main(capsys, "--prompts", str(reqs)), "--model")


def test_config_file_errors(capsys, ckpt, reqs, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_batch_size: 4\nbatch_sise: 8\n")
    one_line_error(*run_main(capsys, "--config", str(cfg), *base(ckpt, reqs, tmp_path)), "c.yaml", "batch_sise")
    cfg.write_text("max_batch_size: lots\n")
    one_line_error(*run_main(capsys, "--config", str(cfg), *base(ckpt, reqs, tmp_path)), "max_batch_size", "lots")
    one_line_error(*run_main(capsys, "--config", str(tmp_path / "nope.yaml"), *base(ckpt, reqs, tmp_path)), "nope.yaml")


def test_config_file_unknown_key_suggests_the_closest(capsys, ckpt, reqs, tmp_path):
    cfg = tmp_path / "x.yaml"
    cfg.write_text("max_batch_size: 4\nmax_batch_sise: 8\n")
    line = one_line_error(*run_main(capsys, "--config", str(cfg), *base(ckpt, reqs, tmp_path)))
    assert line == f"error: {cfg}: unknown key 'max_batch_sise'; did you mean 'max-batch-size'?"
    cfg.write_text("zzz: 1\n")  # nothing close: every key is listed
    one_line_error(*run_main(capsys, "--config", str(cfg), *base(ckpt, reqs, tmp_path)), "'zzz'", "known keys", "kv-capacity-tokens")


def test_config_file_syntax_error_names_its_line(capsys, ckpt, reqs, tmp_path):
    cfg = tmp_path / "x.yaml"
    cfg.write_text("max_batch_size: 4\ndevice: cpu\n seed: 3\n")
    line = one_line_error(*run_main(capsys, "--config", str(cfg), *base(ckpt, reqs, tmp_path)))
    assert line == f"error: {cfg} line 3: mapping values are not allowed here"
    cfg.write_text("device: cpu\nlayers_per_stage: [1, 3\n")  # an unclosed list: found at the end, begun on line 2
    one_line_error(*run_main(capsys, "--config", str(cfg), *base(ckpt, reqs, tmp_path)), f"{cfg} line 3: ", "line 2")


def test_boolean_flags_take_the_same_forms(capsys, ckpt, reqs, tmp_path):
    parse = lambda *flags: cli.parse(["--model", "m", "--prompts", "p", *flags])[0]  # noqa: E731
    on = parse("--swap", "--async-scheduling", "--ignore-eos", "--progress", "--standby-preload", "--triton-ops")
    off = parse("--no-swap", "--no-async-scheduling", "--no-ignore-eos", "--no-progress", "--no-standby-preload",
                "--no-triton-ops")
    for cfg, want in ((on, True), (off, False)):
        assert (cfg.cache.swap, cfg.pipeline.async_scheduling, cfg.generation.ignore_eos, cfg.runtime.progress,
                cfg.ft.standby_preload, cfg.kernels.triton_ops) == (want,) * 6
    assert parse("--ft", "off").ft.enabled is False and parse("--ft", "on").ft.enabled is True
    one_line_error(*run_main(capsys, *base(ckpt, reqs, tmp_path, "--swap", "false")), "unrecognized", "false")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("swap: yes\nprogress: false\nft: off\n")  # YAML's booleans; ft's on/off too
    run = parse("--config", str(cfg))
    assert run.cache.swap is True and run.runtime.progress is False and run.ft.enabled is False
    cfg.write_text("swap: maybe\n")
    one_line_error(*run_main(capsys, "--config", str(cfg), *base(ckpt, reqs, tmp_path)), "'swap'", "true or false")


def test_every_field_is_a_flag_with_the_dataclass_default():
    """Defaults are written once, in the dataclasses: no flags give the dataclasses' values, every field
    has a flag, and each flag's help shows its field's default."""
    from dataclasses import MISSING, fields, is_dataclass

    from dejavu_py import config, flags

    run, _ = cli.parse(["--model", "m", "--prompts", "p"])
    sections = {f.name: getattr(run, f.name) for f in fields(run) if is_dataclass(getattr(run, f.name))}
    for name, value in sections.items():
        assert value == type(value)(), name
    helps = {a.dest: a.help for a in cli.build_parser()._actions}
    by_field = {(fl.section, fl.field): fl for fl in flags.all_flags()}
    for section, cls in {"": config.RunConfig, **{name: type(v) for name, v in sections.items()}}.items():
        for f in fields(cls):
            if section == "" and f.name in sections:
                continue
            flag = by_field[section, f.name]
            if f.default not in (None, MISSING):
                shown = {True: "on", False: "off"}.get(f.default) if isinstance(f.default, bool) else (
                    f"{f.default:g}" if isinstance(f.default, float) else str(f.default))
                assert helps[flag.dest].endswith(f"(default: {shown})"), (flag.name, helps[flag.dest])
    names = {fl.name for fl in flags.all_flags()}
    assert {"kv-capacity-tokens", "ft", "comm-timeout", "startup-timeout", "hang-timeout", "recovery-timeout",
            "moe-kernel", "trace-steps"} <= names


def test_kernel_and_trace_flags(capsys, ckpt, reqs, tmp_path):
    run, _ = cli.parse(["--model", "m", "--prompts", "p", "--moe-kernel", "grouped", "--moe-align", "torch",
                        "--no-fuse-projections", "--no-fold-moe", "--trace-dir", "t", "--trace-steps", "3:9"])
    k = run.kernels
    assert (k.moe_kernel, k.moe_align, k.fuse_projections, k.fold_moe, k.triton_ops) == ("grouped", "torch", False, False, True)
    assert run.runtime.trace_dir == Path("t") and run.runtime.trace_steps == (3, 9)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("trace_dir: t\ntrace_steps: [100, 120]\nmoe_kernel: loop\ntriton_ops: false\n")
    run, _ = cli.parse(["--config", str(cfg), "--model", "m", "--prompts", "p"])
    assert run.runtime.trace_steps == (100, 120) and run.kernels.moe_kernel == "loop" and not run.kernels.triton_ops
    one_line_error(*run_main(capsys, *base(ckpt, reqs, tmp_path, "--moe-kernel", "bogus")), "--moe-kernel", "bogus")
    one_line_error(*run_main(capsys, *base(ckpt, reqs, tmp_path, "--trace-dir", "t")), "--trace-dir", "--trace-steps")
    one_line_error(*run_main(capsys, *base(ckpt, reqs, tmp_path, "--trace-dir", "t", "--trace-steps", "9:3")), "9:3")


def test_config_file_sets_defaults_and_flags_win(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_batch_size: 4\nlayers_per_stage: [1, 3]\ndevice: cpu\nignore_eos: true\n")
    run, _ = cli.parse(["--config", str(cfg), "--model", "m", "--prompts", "p", "--max-batch-size", "9"])
    assert run.scheduler.max_batch_size == 9
    assert run.pipeline.layers_per_stage == [1, 3] and run.pipeline.device == "cpu"
    assert run.generation.ignore_eos is True
    assert run.output == run.run_dir / "outputs.jsonl"


# ---- stage split (issue scope 4) -----------------------------------------------------------------


def test_split_does_not_add_up(capsys, ckpt, reqs, tmp_path):
    one_line_error(
        *run_main(capsys, *base(ckpt, reqs, tmp_path, "--nproc-per-node", "2", "--layers-per-stage", "1,1")),
        "--layers-per-stage 1,1", "adds up to 2", "4 layers",
    )


def test_split_wrong_count(capsys, ckpt, reqs, tmp_path):
    one_line_error(
        *run_main(capsys, *base(ckpt, reqs, tmp_path, "--nproc-per-node", "2", "--layers-per-stage", "1,1,2")),
        "3 entries for 2 stages",
    )


def test_more_stages_than_layers(capsys, ckpt, reqs, tmp_path):
    one_line_error(*run_main(capsys, *base(ckpt, reqs, tmp_path, "--nproc-per-node", "5")), "5 stages", "only 4 decoder layers")


def test_stage_count_mismatch(capsys, ckpt, reqs, tmp_path):
    one_line_error(
        *run_main(capsys, *base(ckpt, reqs, tmp_path, "--nproc-per-node", "2", "--stages", "3")), "--stages 3", "2 processes"
    )


# ---- checkpoint (issue scope 3) ------------------------------------------------------------------


def test_unknown_model_type(capsys, ckpt, reqs, tmp_path):
    bad = copy_ckpt(ckpt, tmp_path / "bad")
    raw = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**raw, "model_type": "gpt2"}))
    one_line_error(*run_main(capsys, *base(bad, reqs, tmp_path)), "config.json", "model_type", "'gpt2'", "qwen2_moe")


def test_missing_and_misshaped_tensor(capsys, ckpt, reqs, tmp_path):
    bad = copy_ckpt(ckpt, tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    tensors.pop("model.layers.3.mlp.experts.5.down_proj.weight")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    one_line_error(
        *run_main(capsys, *base(bad, reqs, tmp_path, "--nproc-per-node", "2")),
        "model.safetensors", "model.layers.3.mlp.experts.5.down_proj.weight", "missing",
    )
    tensors["model.layers.3.mlp.experts.5.down_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    one_line_error(*run_main(capsys, *base(bad, reqs, tmp_path)), "down_proj", "[3, 3]", "expected")


def test_missing_and_corrupt_shard(capsys, reqs, tmp_path):
    ck = make_checkpoint(tmp_path / "sharded", family="mixtral", seed=2, max_shard_size="150KB", tokenizer=False)
    shards = sorted(p.name for p in ck.glob("model-*.safetensors"))
    data = (ck / shards[-1]).read_bytes()
    (ck / shards[-1]).write_bytes(data[: len(data) // 3])
    one_line_error(*run_main(capsys, *base(ck, reqs, tmp_path)), shards[-1], "safetensors")
    (ck / shards[-1]).unlink()
    one_line_error(*run_main(capsys, *base(ck, reqs, tmp_path)), shards[-1], "does not exist")


def test_missing_checkpoint_dir(capsys, reqs, tmp_path):
    one_line_error(*run_main(capsys, *base(tmp_path / "nowhere", reqs, tmp_path)), "nowhere", "config.json")


# ---- request file (issue scope 7, whole-file problems) --------------------------------------------


def test_missing_or_empty_requests_file(capsys, ckpt, tmp_path):
    one_line_error(*run_main(capsys, *base(ckpt, tmp_path / "none.jsonl", tmp_path)), "none.jsonl", "no such file")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    one_line_error(*run_main(capsys, *base(ckpt, empty, tmp_path)), "empty.jsonl", "no requests")


# ---- run directory and output: checked before anything starts ----------------------------------------


def other_jobs_run_dir(ckpt: Path, tmp_path: Path) -> Path:
    """A run directory whose journal was written for another request file."""
    other = write_requests(tmp_path / "other.jsonl", [{"id": "z", "input_ids": [9], "max_new_tokens": 1}])
    run = tmp_path / "run"
    journal = Journal(run / "journal.jsonl", fingerprint(other, ckpt))
    journal.start()
    journal.close()
    return run


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() if p.is_file() else b"" for p in sorted(d.rglob("*"))}


@pytest.mark.parametrize("extra", [[], ["--nproc-per-node", "2"]])
def test_run_dir_of_another_job_is_refused_before_anything_starts(capsys, ckpt, reqs, tmp_path, extra):
    run = other_jobs_run_dir(ckpt, tmp_path)
    before = snapshot(run)
    line = one_line_error(*run_main(capsys, *base(ckpt, reqs, tmp_path, *extra)),
                          f"run directory {run} ", "another job", "another --run-dir", f"delete {run}")
    assert "journal" in line
    assert snapshot(run) == before  # no log, no worker, the other job's journal untouched


def test_run_dir_of_the_same_job_passes(ckpt, reqs, tmp_path):
    cfg, _ = cli.parse(base(ckpt, reqs, tmp_path))
    journal = Journal(cfg.run_dir / "journal.jsonl", fingerprint(reqs, ckpt))
    journal.start()
    journal.close()
    check_run_dir(cfg)  # a rerun resumes it
    reqs.write_text(reqs.read_text() + '{"id": "b", "input_ids": [1]}\n')
    with pytest.raises(UserError, match="another job"):
        check_run_dir(cfg)


def test_run_dir_and_output_must_be_writable_places(capsys, ckpt, reqs, tmp_path):
    (tmp_path / "afile").write_text("")
    one_line_error(*run_main(capsys, *base(ckpt, reqs, tmp_path), "--run-dir", str(tmp_path / "afile")),
                   "--run-dir", "afile", "is a file")
    one_line_error(*run_main(capsys, *base(ckpt, reqs, tmp_path), "--output", str(tmp_path)),
                   "--output", "is a directory")
    one_line_error(*run_main(capsys, *base(ckpt, reqs, tmp_path), "--output", str(tmp_path / "afile" / "o.jsonl")),
                   "--output", "afile is a file, not a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_output_in_a_read_only_folder(capsys, ckpt, reqs, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    one_line_error(*run_main(capsys, *base(ckpt, reqs, tmp_path), "--output", str(ro / "sub" / "o.jsonl")),
                   "--output", f"cannot write in {ro}")


# ---- real processes -------------------------------------------------------------------------------


def test_subprocess_front_end_error_is_one_line(ckpt, reqs, tmp_path):
    proc = dejavu(base(ckpt, reqs, tmp_path, "--nproc-per-node", "2", "--layers-per-stage", "3,3"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --layers-per-stage 3,3: adds up to 6, the model has 4 layers"
    ], proc.stderr


def test_under_torchrun_rank0_says_the_error(ckpt, reqs, tmp_path):
    bad = copy_ckpt(ckpt, tmp_path / "bad")
    raw = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**raw, "model_type": "falcon"}))
    proc = torchrun(2, base(bad, reqs, tmp_path))
    assert proc.returncode != 0
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(ours) == 1 and "'falcon'" in ours[0], proc.stderr  # torchrun appends its own report
    assert "dejavu_py/" not in proc.stderr  # no traceback through our code
    # torchrun's report ends with its root cause, whose message is the rank's error file: our line
    lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
    assert set(lines[-1]) == {"="} and lines[-2] == f"traceback : {ours[0]}", proc.stderr[-2000:]


def test_a_ranks_user_error_goes_to_the_launchers_error_file(tmp_path, monkeypatch, capsys):
    """Each rank writes it where torchrun reads a failed rank's error; only rank 0 prints it, and not when
    the front end prints it after the ranks have exited."""
    from dejavu_py.runtime import user_errors

    monkeypatch.delenv(user_errors.LAUNCHER_PRINTS, raising=False)
    for rank in (1, 0):
        monkeypatch.setenv(user_errors.ERROR_FILE, str(tmp_path / f"{rank}.json"))
        user_errors.report("--x 3: too many", rank)
        assert user_errors.reported_line(json.loads((tmp_path / f"{rank}.json").read_text())["message"]) == "error: --x 3: too many"
    assert capsys.readouterr().err == "error: --x 3: too many\n"  # rank 0's alone
    monkeypatch.setenv(user_errors.LAUNCHER_PRINTS, "1")
    user_errors.report("--x 3: too many", 0)
    assert capsys.readouterr().err == ""
    assert user_errors.reported_line("Signal 9 (SIGKILL) received by PID 7") is None  # torch's own messages


def test_front_end_prints_a_ranks_error_last(ckpt, reqs, tmp_path):
    """A mistake only the running ranks find (here --device cuda where no GPU is visible: each stage
    worker finds it when it starts) is one line, printed by the front end after every rank has exited:
    the last line, and the launcher's own failure report left out."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine where no GPU is visible")
    proc = dejavu(base(ckpt, reqs, tmp_path, "--nproc-per-node", "2", "--config", str(ROOT / "configs/tiny-cpu.yaml"),
                       "--device", "cuda"))
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "started worker of s0" in proc.stderr, proc.stderr  # found by the ranks, not the front end's check
    assert lines[-1] == "error: --device cuda: no GPU is visible to this process (check CUDA_VISIBLE_DEVICES)"
    assert [ln for ln in lines if "error: " in ln] == lines[-1:], proc.stderr
    assert "Traceback" not in proc.stderr and "torch/distributed" not in proc.stderr, proc.stderr


def test_front_end_runs_the_pipeline(ckpt, reqs, tmp_path):
    out = tmp_path / "o.jsonl"
    proc = dejavu(base(ckpt, reqs, tmp_path, "--nproc-per-node", "2", "--config", str(ROOT / "configs/tiny-cpu.yaml"),
                       "--output", str(out)))
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(out.read_text())
    assert rec["id"] == "a" and len(rec["output_ids"]) == 2
    assert "done: 1/1 requests" in proc.stderr


@pytest.mark.parametrize("flags,first,last", [(["--stages", "3"], "s0", "s2"),
                                              (["--prompt-stages", "1", "--token-stages", "3"], "t0", "t2")])
def test_last_stage_has_an_edge_to_the_first(flags, first, last):
    """The last decode stage hands its sampled ids straight to the first (asynchronous scheduling), so
    they have an edge; with two stages it is their pipeline edge, listed once."""
    from dejavu_py.protocol.layout import build_layout

    cfg, _ = cli.parse(["--model", "m", "--prompts", "p", *flags])
    layout = build_layout(cfg, 6, 3 + ("--prompt-stages" in flags))
    assert (first, last) in layout.edges() and last in layout.peers_of(first)
    two, _ = cli.parse(["--model", "m", "--prompts", "p", "--stages", "2"])
    assert build_layout(two, 6, 2).edges().count(("s0", "s1")) == 1
