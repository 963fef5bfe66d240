"""Bad input gets one clear line before any work, never a traceback (each case as it was reported)."""

import errno
import gzip
from pathlib import Path

import pytest

from conftest import tiny_overrides
from fedlora.cli import main


def error_of(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedlora: error:") and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "override,expected",
    [
        ("adapter.rank=1000000000", "above min(d, k)"),
        ("resources.rank_scale=.inf", "resources.rank_scale"),
        ("client.num_threads=100000", "client.num_threads"),
        ("federation.rounds=1e12", "federation.rounds"),
        ("client.lr=.inf", "client.lr"),
        ("adapter.alpha=.nan", "adapter.alpha"),
        ("strategy.name=fedprox", None),  # with the mu below
        ("name=../../escape", "config field 'name'"),
    ],
)
def test_bad_values_fail_before_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, expected: str | None
) -> None:
    extra = ["strategy.options={mu: .inf}"] if override == "strategy.name=fedprox" else []
    out = tmp_path / "run"
    err = error_of(capsys, ["run", *tiny_overrides(tmp_path), override, *extra, "--output", str(out)])
    assert (expected or "strategy.options.mu") in err
    assert not (out / "config.yaml").exists()


def test_bad_files_are_named_with_their_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "is a directory, not a config file" in error_of(capsys, ["run", str(tmp_path)])
    duplicate = tmp_path / "dup.yaml"
    duplicate.write_text("federation:\n  rounds: 2\n  rounds: 9\n")
    assert "dup.yaml:3: key 'rounds' is given twice" in error_of(capsys, ["run", str(duplicate)])
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"name: ok\nmodel: {name: caf\xe9}\n")
    assert "latin.yaml:2: not UTF-8" in error_of(capsys, ["run", str(latin)])

    def data_error(name: str, content: bytes) -> str:
        path = tmp_path / name
        path.write_bytes(content)
        return error_of(capsys, ["run", *tiny_overrides(tmp_path), "data.source=json", f"data.path={path}"])

    good = b'{"instruction": "a", "output": "b"}\n'
    assert "not a gzip file" in data_error("plain.jsonl.gz", good * 3)
    assert "truncated" in data_error("cut.jsonl.gz", gzip.compress(good * 200)[:-30])
    assert "bad.jsonl:2: not UTF-8" in data_error("bad.jsonl", good + b'{"instruction": "\xff"}\n')
    assert "deep.jsonl:1: JSON nested too deeply" in data_error("deep.jsonl", b"[" * 100_000 + b"]" * 100_000)


def test_a_full_disk_at_start_leaves_no_empty_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedlora.engine import run_folder

    def full(handle_path, data):  # noqa: ANN001
        raise OSError(errno.ENOSPC, "No space left on device", str(handle_path))

    monkeypatch.setattr(run_folder, "atomic_write_bytes", full)
    out = tmp_path / "run"
    err = error_of(capsys, ["run", *tiny_overrides(tmp_path), "--output", str(out)])
    assert "No space left on device" in err
    assert not (out / "config.yaml").exists()


def test_eval_on_a_damaged_adapter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    assert main(["run", *tiny_overrides(tmp_path, **{"federation.rounds": 1}), "--output", str(run_dir)]) == 0
    capsys.readouterr()
    adapter = run_dir / "global" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])
    assert "is damaged" in error_of(capsys, ["eval", str(run_dir)])


def alias_bomb(levels: int, width: int) -> str:
    lines = [f"a0: &a0 [{', '.join(['x'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "text,expected",
    [
        (alias_bomb(9, 9), "aliases expand to more than 100,000 values"),
        ("name: " + "[" * 20_000 + "\n", ":1: nested more than 64 levels deep"),
        ("name: a\x00b\n", ":1: a NUL byte"),
        ("name: " + "x" * 2_000_000 + "\n", "a config file is at most 1,048,576 bytes"),
        ("federation:\n  rounds: true\n", "config field 'federation.rounds': Value error, true/false given"),
        ("plugins: ['../../etc/passwd']\n", "config field 'plugins.0'"),
        ("plugins: ['']\n", "config field 'plugins.0'"),
    ],
)
def test_hostile_config_files_are_one_bounded_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    err = error_of(capsys, ["config", str(path)])
    assert expected in err, err[:500]
    assert len(err) < 2_000  # no value is echoed whole


def test_a_small_alias_tree_still_reads(tmp_path: Path) -> None:
    from fedlora.config.loader import read_yaml

    path = tmp_path / "ok.yaml"
    path.write_text(alias_bomb(3, 9))  # 9^3 = 729 values: real configs use a few anchors, this still reads
    assert len(read_yaml(path)["a2"]) == 9


def test_a_long_value_is_echoed_at_most_200_characters(capsys: pytest.CaptureFixture[str]) -> None:
    err = error_of(capsys, ["config", "name=" + "x" * 5_000_000])
    assert "... (5,000,002 characters)" in err and len(err) < 1_000


def test_a_plugin_that_cannot_be_imported_names_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    err = error_of(capsys, ["run", "plugins=[no_such_module_xyz]", "--output", str(tmp_path / "a")])
    assert "config field 'plugins': cannot import 'no_such_module_xyz'" in err
    (tmp_path / "broken_plugin.py").write_text("raise RuntimeError('half-written plugin')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    err = error_of(capsys, ["run", "plugins=[broken_plugin]", "--output", str(tmp_path / "b")])
    assert "importing 'broken_plugin' failed (RuntimeError: half-written plugin)" in err
