"""Report: table and chart from results files; clear errors on bad paths."""
import json
import re

import pytest

from editing.report import (bar_chart, default_columns, load_results, main, markdown_table, method_names,
                            summary_table)


def fake(tmp_path, name, method, rel, num_edits=50, **metrics):
    d = tmp_path / name / "lightning_logs" / "version_0"
    d.mkdir(parents=True)
    res = {"method": method, "model": "smollm2-135m", "data": "pararel_counterfactual", "num_edits": num_edits,
           "edit_batch_size": 1, "timing": {"edit": 12.34, "evaluate": 5.0},
           "metrics": {"reliability": rel, "generality": 40.0, "locality": 90.0, "score": 55.55, "rewrite_acc": 12.0,
                       **metrics},
           "config": {"lr": 0.1}}
    (d / "results.json").write_text(json.dumps(res))
    return d


def test_table_and_chart(tmp_path, capsys):
    fake(tmp_path, "ft", "ft", 99.0)
    fake(tmp_path, "noedit", "noedit", 3.0, locality_unchanged=100, fluency=5.25)
    results = load_results([tmp_path / "ft", str(tmp_path / "noedit" / "*" / "*")])
    assert [r["method"] for r in results] == ["ft", "noedit"]
    table = markdown_table(results)
    lines = table.splitlines()
    assert lines[0] == ("| method | model | data | num_edits | edit_batch_size | reliability | generality | locality "
                        "| score | rewrite_acc | locality_unchanged | fluency | edit_s | eval_s |")
    assert lines[1] == "|" + "---|" * 14
    assert lines[2] == "| ft | smollm2-135m | pararel_counterfactual | 50 | 1 | 99.0 | 40.0 | 90.0 | 55.5 | 12.0 | – | – | 12.3 | 5.0 |"
    assert lines[3] == "| noedit | smollm2-135m | pararel_counterfactual | 50 | 1 | 3.0 | 40.0 | 90.0 | 55.5 | 12.0 | 100.0 | 5.2 | 12.3 | 5.0 |"
    assert len(lines) == 4
    assert markdown_table(results, ["fluency", "nope"]).splitlines()[2].endswith("| – | – | 12.3 | 5.0 |")
    png = bar_chart(results, tmp_path / "out" / "chart.png")
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 1000

    main([str(tmp_path), "--out", str(tmp_path / "t.md"), "--plot", str(tmp_path / "p.png"), "--columns", "reliability, fluency"])
    written = (tmp_path / "t.md").read_text()
    assert written.splitlines()[0].endswith("| reliability | fluency | edit_s | eval_s |")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "noedit" in printed and written.startswith(printed.strip())
    # the definitions of the columns shown are written under the table
    assert "- `reliability`:" in written and "- `fluency`:" in written and "- `locality`" not in written


def test_same_file_twice_is_loaded_once_and_missing_values(tmp_path):
    d = fake(tmp_path, "a", "rome", float("nan"))
    data = json.loads((d / "results.json").read_text())
    data.pop("timing")
    data["metrics"]["score"] = None
    (d / "results.json").write_text(json.dumps(data))
    results = load_results([d, d / "results.json", str(tmp_path / "*")])
    assert len(results) == 1 and results[0]["_path"] == str(d / "results.json")
    row = markdown_table(results).splitlines()[2]
    assert row == "| rome | smollm2-135m | pararel_counterfactual | 50 | 1 | – | 40.0 | 90.0 | – | 12.0 | – | – |"


def test_default_columns_order():
    results = [{"metrics": {"zeta": 1, "locality_acc": 2, "rewrite_win": 3, "score_mean": 4, "reliability": 5}}]
    assert default_columns(results) == ["reliability", "generality", "locality", "score", "score_mean",
                                        "locality_acc", "rewrite_win", "zeta"]


def test_chart_labels_with_differing_num_edits(tmp_path):
    from editing.report import _labels
    fake(tmp_path, "a", "memit", 90.0, num_edits=10)
    fake(tmp_path, "b", "memit", 80.0, num_edits=100)
    results = load_results([tmp_path / "a", tmp_path / "b"])
    assert _labels(results) == ["memit (10)", "memit (100)"]
    assert _labels(results[:1]) == ["memit"]
    png = bar_chart(results, tmp_path / "c.png", metrics=("reliability", "fluency"))
    assert png.stat().st_size > 1000


def test_errors_name_the_file(tmp_path, capsys):
    with pytest.raises(SystemExit, match="no results.json"):
        load_results([tmp_path / "missing"])
    with pytest.raises(SystemExit, match=re.escape(str(tmp_path / "nothing-*"))):
        load_results([str(tmp_path / "nothing-*")])
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(SystemExit, match="no results.json at .*empty_run"):
        main([str(tmp_path / "empty_run")])
    bad = tmp_path / "bad" / "results.json"
    bad.parent.mkdir()
    bad.write_text("{oops")
    with pytest.raises(SystemExit, match=re.escape(str(bad))):
        load_results([bad])
    with pytest.raises(SystemExit, match=re.escape(str(bad))):
        main([str(tmp_path / "bad")])
    for content in ("[1, 2]", json.dumps({"method": "x"}), json.dumps({"metrics": {"reliability": "high"}})):
        bad.write_text(content)
        with pytest.raises(SystemExit, match=re.escape(str(bad))):
            load_results([tmp_path / "bad"])
    assert capsys.readouterr().out == ""


def test_same_method_runs_are_told_apart_by_their_differing_settings(tmp_path):
    for name, layers in (("a", [3, 4]), ("b", [6, 7])):
        d = fake(tmp_path, name, "memit", 90.0)
        data = json.loads((d / "results.json").read_text())
        data["config"] = {"model": {"_class_path": name, "layers": layers, "mom2_update_weight": 1000.0}}
        (d / "results.json").write_text(json.dumps(data))
    fake(tmp_path, "c", "noedit", 3.0)
    results = load_results([tmp_path / "a", tmp_path / "b", tmp_path / "c"])
    assert method_names(results) == ["memit [layers=[3, 4]]", "memit [layers=[6, 7]]", "noedit"]
    rows = markdown_table(results).splitlines()[2:]
    assert rows[0].startswith("| memit [layers=[3, 4]] | smollm2-135m |") and rows[2].startswith("| noedit |")
    png = bar_chart(results, tmp_path / "chart.png")
    assert png.stat().st_size > 1000


def test_identical_runs_are_told_apart_by_their_run_folder(tmp_path, monkeypatch):
    """Two runs of one method with the same settings: the run folder tells them apart, in the table
    and in the chart's legend."""
    for version in ("version_0", "version_1"):
        d = tmp_path / "ft" / "lightning_logs" / version
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({"method": "ft", "metrics": {"reliability": 50.0},
                                                     "config": {"model": {"lr": 0.1}}}))
    results = load_results([tmp_path])
    assert method_names(results) == ["ft (version_0)", "ft (version_1)"]
    from matplotlib.axes import Axes
    legends = []
    monkeypatch.setattr(Axes, "legend", lambda self, *a, **k: legends.append(self.get_legend_handles_labels()[1]))
    labels = []
    real = Axes.bar_label
    monkeypatch.setattr(Axes, "bar_label", lambda self, bars, **k: labels.append(real(self, bars, **k)))
    bar_chart(results, tmp_path / "chart.png")
    assert legends == [["ft (version_0)", "ft (version_1)"]]
    assert [[t.get_text() for t in texts] for texts in labels][0][0] == "50.0"  # value labels on the bars


def _doc(style="counterfact", unedited=True):
    metrics = {"reliability": 96.04, "generality": 71.26, "locality": 63.0, "score": 74.1, "rewrite_acc": 80.0,
               "neighborhood_unchanged": 90.0}
    doc = {"method": "memit", "model": "smollm2-135m", "data": "pararel_counterfactual", "num_edits": 50,
           "edit_batch_size": 50, "timing": {"edit": 61.0, "evaluate": 200.0}, "metrics": metrics, "style": style}
    if unedited:
        doc["unedited"] = {"reliability": 12.0, "generality": 15.5, "locality": 88.0, "score": 19.9,
                           "rewrite_acc": 3.0, "neighborhood_unchanged": 100.0}
    return doc


def test_summary_table_is_compact_and_says_what_each_row_means():
    lines = summary_table(_doc()).splitlines()
    assert lines[0].startswith("memit · 50 edits in steps of 50 · pararel_counterfactual · smollm2-135m · edit 61.0 s")
    assert "evaluation 3.3 min" in lines[0]
    header, rows = lines[2], lines[4:8]
    assert [c.strip() for c in header.strip("|").split("|")][:3] == ["metric", "edited", "unedited"]
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
    assert [c[:3] for c in cells] == [["reliability", "96.0", "12.0"], ["generality", "71.3", "15.5"],
                                      ["locality", "63.0", "88.0"], ["score", "74.1", "19.9"]]
    assert "new target outscores the true one" in cells[0][3]
    assert all(len(l) <= 110 for l in lines)          # fits a terminal
    assert "rewrite_acc" not in "\n".join(lines)      # only the headline rows by default
    zsre = summary_table(_doc("zsre"))
    assert "new target's tokens predicted on the edit prompt" in zsre
    verbose = summary_table(_doc(), verbose=True)
    assert "| rewrite_acc" in verbose and "| neighborhood_unchanged" in verbose and "100.0" in verbose
    # without the unedited scores the column says so instead of inventing numbers
    assert "| reliability |   96.0 |        – |" in summary_table(_doc(unedited=False))


def test_a_run_folder_without_results_is_skipped_among_others(tmp_path, capsys):
    """`runs/*/lightning_logs/version_*/` also matches predict/export runs: skipped, with a note."""
    (tmp_path / "v0").mkdir()
    (tmp_path / "v0" / "results.json").write_text(json.dumps({"method": "ft", "metrics": {"reliability": 90.0}}))
    (tmp_path / "v1").mkdir()
    results = load_results([tmp_path / "v0", tmp_path / "v1"])
    assert [r["method"] for r in results] == ["ft"]
    assert "skipped" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no results.json at .*v1"):
        load_results([tmp_path / "v1"])
    with pytest.raises(SystemExit, match="no results.json at .*typo"):
        load_results([tmp_path / "v0", tmp_path / "typo"])


def test_evaluation_settings_do_not_name_a_run():
    a = {"method": "ft", "metrics": {}, "_path": "runs/ft/v0/results.json",
         "config": {"model": {"lr": 1e-4, "eval_unedited": True}}}
    b = {**a, "_path": "runs/ft/v1/results.json", "config": {"model": {"lr": 1e-4, "eval_unedited": False}}}
    c = {**a, "_path": "runs/ft/v2/results.json", "config": {"model": {"lr": 1e-3, "eval_unedited": False}}}
    assert method_names([a, b]) == ["ft (v0)", "ft (v1)"]
    assert method_names([a, c]) == ["ft [lr=0.0001]", "ft [lr=0.001]"]


def test_worst_cases_come_from_cases_jsonl(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"method": "memit", "style": "counterfact",
                                                  "metrics": {"reliability": 50.0}}))
    cases = [{"case": i, "case_id": f"c{i}", "subject": f"S{i}", "target_new": "T",
              "prompts": [{"kind": "rewrite", "prompt": "p", "target": "T", "generated": f" gen {i}"}],
              "scores": {"rewrite_win": w, "paraphrase_win": w, "neighborhood_win": 100.0, "rewrite_gen": g}}
             for i, (w, g) in enumerate([(100.0, 100.0), (0.0, 0.0), (50.0, 0.0)])]
    (run / "cases.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cases))
    main([str(run), "--cases", "2"])
    out = capsys.readouterr().out
    rows = [l for l in out.splitlines() if l.startswith("| c") and not l.startswith("| case")]
    assert [r.split("|")[1].strip() for r in rows] == ["c1", "c2"]        # lowest mean first, N of them
    assert "gen 1" in rows[0] and "gen_reliability" in out
    (run / "cases.jsonl").write_text("not json\n")
    with pytest.raises(SystemExit, match="line 1"):
        main([str(run), "--cases", "2"])
