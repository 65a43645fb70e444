"""Report: table and chart from results files; clear errors on bad paths."""
import json

import pytest

from editing.report import bar_chart, load_results, main, markdown_table


def fake(tmp_path, name, method, rel):
    d = tmp_path / name / "lightning_logs" / "version_0"
    d.mkdir(parents=True)
    res = {"method": method, "model": "smollm2-135m", "data": "pararel_counterfactual", "num_edits": 50,
           "edit_batch_size": 1, "timing": {"edit": 12.34, "evaluate": 5.0},
           "metrics": {"reliability": rel, "generality": 40.0, "locality": 90.0, "score": 55.55, "rewrite_acc": 12.0}}
    (d / "results.json").write_text(json.dumps(res))
    return d


def test_table_and_chart(tmp_path, capsys):
    fake(tmp_path, "ft", "ft", 99.0)
    fake(tmp_path, "noedit", "noedit", 3.0)
    results = load_results([tmp_path / "ft", str(tmp_path / "noedit" / "*" / "*")])
    table = markdown_table(results)
    lines = table.splitlines()
    assert lines[0].startswith("| method | model | data | num_edits | edit_batch_size | reliability")
    assert "| ft | smollm2-135m | pararel_counterfactual | 50 | 1 | 99.0 | 40.0 | 90.0 | 55.5 | 12.0 | 12.3 | 5.0 |" in table
    assert len(lines) == 4
    png = bar_chart(results, tmp_path / "out" / "chart.png")
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 1000
    main([str(tmp_path), "--out", str(tmp_path / "t.md"), "--plot", str(tmp_path / "p.png"), "--columns", "reliability"])
    assert "reliability" in (tmp_path / "t.md").read_text() and (tmp_path / "p.png").exists()
    assert "noedit" in capsys.readouterr().out


def test_errors_name_the_file(tmp_path):
    with pytest.raises(SystemExit, match="no results.json"):
        load_results([tmp_path / "missing"])
    bad = tmp_path / "results.json"
    bad.write_text("{oops")
    with pytest.raises(SystemExit, match=str(bad)):
        load_results([bad])
