"""Bad input from the CLI: one line, exit 2, nothing destroyed or left behind."""

import json
import shutil

from typer.testing import CliRunner

from megallama.cli import app

runner = CliRunner()


def test_output_containing_the_input_is_refused_and_input_survives(hf_dir, tmp_path):
    parent = tmp_path / "parent"
    shutil.copytree(hf_dir, parent / "hf")
    result = runner.invoke(app, ["convert", "hf2pth", "--input-dir", str(parent / "hf"), "--output-dir",
                                 str(parent), "--force"])
    assert result.exit_code == 2
    assert "overlap" in result.output and len(result.output.strip().splitlines()) == 1
    assert (parent / "hf" / "config.json").exists()


def test_rich_markup_in_a_path_is_printed_verbatim(tmp_path):
    missing = tmp_path / "a[/b]" / "x[bold]"
    result = runner.invoke(app, ["convert", "pth2hf", "--input-dir", str(missing), "--output-dir",
                                 str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "x[bold]" in result.output and "Traceback" not in result.output


def test_malformed_config_values_exit_2(hf_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_attention_heads"] = 0
    cfg.pop("head_dim", None)
    (bad / "config.json").write_text(json.dumps(cfg))
    result = runner.invoke(app, ["convert", "hf2pth", "--input-dir", str(bad), "--output-dir", str(tmp_path / "o")])
    assert result.exit_code == 2 and "positive integers" in result.output
    assert not (tmp_path / "o").exists()


def test_replacing_an_output_file_with_force_leaves_nothing_behind(hf_dir, tmp_path):
    target = tmp_path / "out"
    target.write_text("not a folder")
    result = runner.invoke(app, ["convert", "hf2pth", "--input-dir", str(hf_dir), "--output-dir", str(target),
                                 "--force"])
    assert result.exit_code == 0, result.output
    assert (target / "params.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
