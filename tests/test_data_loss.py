"""Never lose a user's data, round 3 (issue 25, cases 1 to 5), each case as the adversarial pass found it.

The pause points of runtime/files/atomic.py are set by these tests in their own process (`PAUSE_HOOK`), to do what
a user might at the worst moment: between the writer's last check and putting its work in place.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

import mirasol.runtime.files.atomic as atomic
from mirasol.runtime.errors import OutputError
from mirasol.runtime.files.atomic import atomic_directory, write_file
from mirasol.runtime.files.ownership import check_output_dir, is_temporary, temporary_name

from .conftest import chunk, copy_bundle, run_cli, snapshot


@pytest.fixture
def pause_at(monkeypatch: pytest.MonkeyPatch) -> Callable[[str, Callable[[Path], None]], list[Path]]:
    """`pause_at(stage, act)`: at the first pause point `stage` of a write, `act(path)` runs (the user's move)."""
    def install(stage: str, act: Callable[[Path], None]) -> list[Path]:
        seen: list[Path] = []

        def hook(at: str, path: Path | None) -> None:
            if at == stage and not seen and path is not None:
                seen.append(path)
                act(path)

        monkeypatch.setattr(atomic, "PAUSE_HOOK", hook)
        return seen
    return install


def _new_bundle(work: Path, text: str = "new") -> None:
    (work / "manifest.json").write_text('{"format": "mirasol-bundle", "writer": "%s"}' % text)


# ---- 1. a file put into the bundle between the last check and the swap ---------------------------------------

@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two renames"])
def test_file_put_into_the_bundle_before_the_swap_is_kept(tiny_bundle, tmp_path, pause_at, monkeypatch,
                                                          exchange) -> None:
    if not exchange:  # a platform without renameat2: the old target goes aside first, and comes back
        real = atomic._renameat2
        monkeypatch.setattr(atomic, "_renameat2", lambda a, b, flags: flags != atomic._RENAME_EXCHANGE
                            and real(a, b, flags))
    bundle = copy_bundle(tiny_bundle, tmp_path)
    before = snapshot(bundle)
    seen = pause_at("checked, before the swap", lambda target: (target / "NOTES.md").write_text("mine"))
    with pytest.raises(OutputError, match=r"bundle changed while it was written: it is a mirasol bundle that also "
                                          r"holds 'NOTES.md', which mirasol did not write; it was left as it is now"):
        with atomic_directory(bundle) as work:
            _new_bundle(work)
    assert seen == [bundle] and snapshot(bundle) == {**before, "NOTES.md": snapshot(bundle)["NOTES.md"]}
    assert (bundle / "NOTES.md").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"], "no temporary left"


def test_file_put_into_the_old_bundle_after_the_swap_is_moved_into_the_new(tiny_bundle, tmp_path,
                                                                           pause_at) -> None:
    """Later still (the old copy swapped out, not yet removed): it is put back, beside the new files."""
    bundle = copy_bundle(tiny_bundle, tmp_path)

    def user(target: Path) -> None:
        old = next(p for p in tmp_path.iterdir() if is_temporary(p.name))  # where the old copy now is
        (old / "NOTES.md").write_text("mine")
        (old / "link").symlink_to(tmp_path / "elsewhere")

    pause_at("swapped, old copy not yet removed", user)
    with atomic_directory(bundle) as work:
        _new_bundle(work)
    assert sorted(p.name for p in bundle.iterdir()) == ["NOTES.md", "link", "manifest.json"]
    assert (bundle / "NOTES.md").read_text() == "mine" and os.readlink(bundle / "link") == str(tmp_path / "elsewhere")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


# ---- 2. hidden names are the user's: only our exact temporaries are ours -------------------------------------

def test_hidden_names_like_temporaries_are_the_users(tiny_bundle, tmp_path) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path)
    ours = temporary_name("manifest.json", ".json")  # a leftover of a killed atomic write: ours
    (bundle / ours).write_text("half a manifest")
    check_output_dir(bundle, "bundle")
    with atomic_directory(bundle) as work:
        _new_bundle(work)
    assert sorted(p.name for p in bundle.iterdir()) == ["manifest.json"]
    bundle = copy_bundle(tiny_bundle, tmp_path, "again")
    for name in (".notes.tmp.txt", ".thesis.tmp", ".x.mirasol-tmp-notes", f".x.mirasol-tmp-{'A' * 32}"):
        (bundle / name).write_text("years of work")
        assert not is_temporary(name)
        with pytest.raises(OutputError, match=f"also holds '{name}', which mirasol did not write"):
            with atomic_directory(bundle) as work:
                _new_bundle(work)
        assert (bundle / name).read_text() == "years of work"
        (bundle / name).unlink()


# ---- 3. a Triton repository holds other models: only our model's folder is written ---------------------------

def test_triton_again_keeps_the_other_models_and_files(tiny_bundle, tmp_path) -> None:
    from mirasol.runtime.cli.triton import main

    repo = tmp_path / "repo"
    assert run_cli(main, [str(tiny_bundle), "--out", str(repo)]).exit_code == 0
    (repo / "NOTES.md").write_text("how we serve")
    (repo / "other_model" / "1").mkdir(parents=True)
    (repo / "other_model" / "config.pbtxt").write_text('name: "other_model"')
    result = run_cli(main, [str(tiny_bundle), "--out", str(repo), "--instances", "2"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in repo.iterdir()) == ["NOTES.md", "mirasol", "other_model"]
    assert (repo / "NOTES.md").read_text() == "how we serve"
    assert (repo / "other_model" / "config.pbtxt").read_text() == 'name: "other_model"'
    assert "count: 2" in (repo / "mirasol" / "config.pbtxt").read_text()
    (repo / "mirasol" / "README").write_text("mine")
    refused = run_cli(main, [str(tiny_bundle), "--out", str(repo)])
    assert refused.exit_code == 1 and refused.stderr.splitlines() == [
        f"error: {repo / 'mirasol'} exists and is a mirasol Triton model that also holds 'README', which mirasol did "
        f"not write; nothing was written (choose another output path, or move its contents away yourself)"]


# ---- 4. Stream.save never replaces a file that appeared after its check ---------------------------------------

@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "link and unlink"])
def test_stream_save_keeps_a_file_that_appears_at_its_path(shared_pipeline, tmp_path, pause_at, monkeypatch,
                                                           renameat2) -> None:
    if not renameat2:
        monkeypatch.setattr(atomic, "_renameat2", lambda a, b, flags: False)
    stream = shared_pipeline.stream()
    stream.push(*chunk(shared_pipeline, 0))
    path = tmp_path / "state.npz"
    pause_at("file written, before it is put in place", lambda target: target.write_text("the user's file"))
    with pytest.raises(OutputError, match="state.npz was taken by a file that is not a stream state file written by "
                                          "mirasol while the stream state file was written; that file was kept"):
        stream.save(path)
    assert path.read_text() == "the user's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.npz"], "no temporary left"


def test_stream_save_replaces_a_state_file_another_save_put_there(shared_pipeline, tmp_path, pause_at) -> None:
    """Two streams saving to one path: the file that appeared is ours, so the last complete save wins."""
    first, second = shared_pipeline.stream(), shared_pipeline.stream()
    second.push(*chunk(shared_pipeline, 0))
    path = tmp_path / "state.npz"
    pause_at("file written, before it is put in place", lambda target: first.save(target))
    second.save(path)
    assert shared_pipeline.restore(path).chunks == 1


def test_a_symlink_put_in_place_of_our_file_is_put_back(shared_pipeline, tmp_path, pause_at) -> None:
    path = shared_pipeline.stream().save(tmp_path / "state.npz")
    mine = tmp_path / "notes.md"
    mine.write_text("mine")

    def swap(target: Path) -> None:
        target.unlink()
        target.symlink_to(mine)

    pause_at("file written, before it is put in place", swap)
    with pytest.raises(OutputError, match="was taken by a file that is not a stream state file"):
        shared_pipeline.stream().save(path)
    assert path.is_symlink() and os.readlink(path) == str(mine) and mine.read_text() == "mine"


# ---- 5. benchmark reports: checked before any work, never through a link -------------------------------------

def test_benchmark_report_paths_are_refused_before_any_work(tmp_path) -> None:
    from mirasol.export.bench.cli import main

    results, notes = tmp_path / "results.json", tmp_path / "notes.md"
    results.write_text('{"my": "results"}')
    notes.write_text("my notes")
    (tmp_path / "report.md").symlink_to(notes)
    cases = [
        (["--json", str(results)], f"{results} exists and is not a benchmark JSON report written by mirasol"),
        (["--markdown", str(tmp_path / "report.md")], "report.md: it is a symlink (mirasol never writes through one"),
        (["--json", str(tmp_path / "missing" / "r.json")], "its directory"),
        (["--json", str(tmp_path / "same"), "--markdown", str(tmp_path / "same")], "name the same file"),
    ]
    for args, words in cases:
        result = run_cli(main, ["--quick", *args])
        errors = [line for line in result.stderr.splitlines() if "error:" in line]
        assert result.exit_code in (1, 2) and len(errors) == 1 and words in errors[0], result.output
        assert "model:" not in result.output, "refused before the run"
    assert results.read_text() == '{"my": "results"}' and notes.read_text() == "my notes"


def test_benchmark_reports_of_ours_are_replaced(tmp_path) -> None:
    from mirasol.export.bench.report_files import MARKDOWN_MARK, check_report_paths, write_reports

    json_path, markdown_path = tmp_path / "bench.json", tmp_path / "bench.md"
    write_reports(json_path, '{"format": "mirasol-bench", "run": 1}', markdown_path, f"# run 1\n{MARKDOWN_MARK}\n")
    check_report_paths(json_path, markdown_path)
    write_reports(json_path, '{"format": "mirasol-bench", "run": 2}', markdown_path, f"# run 2\n{MARKDOWN_MARK}\n")
    assert '"run": 2' in json_path.read_text() and markdown_path.read_text().startswith("# run 2")
    markdown_path.write_text("# my own notes, about mirasol-bench\n")
    with pytest.raises(OutputError, match="is not a benchmark Markdown report written by mirasol"):
        check_report_paths(None, markdown_path)


def test_load_figure_report_is_refused_before_any_work_and_ours_replaced(tmp_path) -> None:
    """The load figure's --json (`python -m mirasol.runtime.serve.load`), as the benchmark's reports: checked before
    the bundle is even read (here not a bundle: it would be the error otherwise)."""
    from mirasol.runtime.serve.load import main, write_report

    rows, empty = tmp_path / "rows.json", tmp_path / "empty"
    rows.write_text('{"my": "rows"}')
    empty.mkdir()
    result = run_cli(main, [str(empty), "--json", str(rows)])
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.exit_code == 1 and len(errors) == 1, result.output
    assert f"{rows} exists and is not a load figure report written by mirasol" in errors[0]
    assert rows.read_text() == '{"my": "rows"}'
    for run in (1, 2):
        write_report(tmp_path / "ours.json", {"run": run})
    assert '"run": 2' in (tmp_path / "ours.json").read_text()


def test_the_test_sender_writes_only_into_a_named_pipe(tmp_path) -> None:
    """Its target is a udp:// port or an existing named pipe: a regular file, a link or nothing is refused untouched
    (FFmpeg would create or truncate a file there), before the clip is read; its test clips replace only its own."""
    pytest.importorskip("av")
    from mirasol.runtime.media.sender import send, write_test_clip

    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    (tmp_path / "link.ts").symlink_to(notes)
    for target, words in ((notes, "it is not a named pipe"), (tmp_path / "link.ts", "it is a symlink"),
                          (tmp_path / "new.ts", "No such file or directory")):
        with pytest.raises(OutputError, match=words):
            send(tmp_path / "clip.mp4", str(target), wait_s=1)
    with pytest.raises(OutputError, match="is not a test clip written by mirasol"):
        write_test_clip(notes, seconds=0.5, width=64, height=64, fps=8)
    assert notes.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["link.ts", "notes.txt"]


def test_every_file_writer_refuses_a_users_file_and_a_link(tmp_path) -> None:
    """The rule for a file, wherever it is used: a user's file and a symlink are refused, before anything is made."""
    mine = tmp_path / "mine.txt"
    mine.write_text("mine")
    (tmp_path / "link").symlink_to(mine)
    for path in (mine, tmp_path / "link"):
        with pytest.raises(OutputError):
            write_file(path, b"ours", lambda p: False, "report")
    assert mine.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["link", "mine.txt"]
