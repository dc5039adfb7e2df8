"""``saekit convert`` between formats, and ``saekit rules`` printing plain text."""

from __future__ import annotations

import torch

from io_helpers import close, codes, trained
from saekit.cli import main
from saekit.io import load_sae, save_sae
from saekit.io.native import open_sae


def test_convert_between_formats(tmp_path, capsys) -> None:
    sae = trained("topk", 12, 40, 4)
    save_sae(sae, tmp_path / "run", {"site": "layers.2.resid_post"})
    x = torch.randn(16, 12)
    assert (
        main(
            [
                "convert",
                str(tmp_path / "run"),
                "--to",
                "sparsify",
                "--out",
                str(tmp_path / "layers.2"),
            ]
        )
        == 0
    )
    assert "saekit -> sparsify" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "layers.2"), "--to", "dictionary_learning",
                 "--out", str(tmp_path / "dl")]) == 0  # fmt: skip
    back, meta = open_sae(tmp_path / "dl")  # sparsify names the hook by its directory
    assert meta["format"] == "dictionary_learning" and meta["hook_name"] == "layers.2.resid_post"
    close(codes(back, x), codes(sae, x))
    assert (
        main(["convert", str(tmp_path / "dl"), "--to", "saelens", "--out", str(tmp_path / "sl")])
        == 0
    )
    close(codes(load_sae(tmp_path / "sl"), x), codes(sae, x))
    assert (
        main(["convert", str(tmp_path / "run"), "--to", "gemmascope", "--out", str(tmp_path / "g")])
        == 1
    )
    assert "Gemma Scope format holds jumprelu, standard" in capsys.readouterr().err


def test_rules_prints_no_rest_markup(capsys) -> None:
    assert main(["rules"]) == 0
    out = capsys.readouterr().out
    assert "`" not in out and ":func:" not in out
    assert "abstopk" in out
