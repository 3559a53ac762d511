"""The paper's settings in every experiment config."""

import pytest
from config_helpers import load_config

# (config, CBP length T, (lambda, phi)): Sec. 4.1-4.2 and Table 9 of the paper.
PAPER = [
    ("ade20k_mit_b0", 2.0, (1.0, 0.3)),  # the ablation model (Tables 3-10)
    ("ade20k_mit_b4", 1.0, (1.0, 0.1)),  # SegFormer on ADE20K: T = 1
    ("ade20k_mit_b5", 1.0, (1.0, 0.1)),
    ("ade20k_convnext_base", 2.0, (1.0, 0.2)),  # the default T = 2
    ("cocostuff10k_mit_b5", 1.0, (1.0, 0.1)),  # "1 for Segformer"
    ("cocostuff10k_convnext_base", 2.0, (1.0, 0.3)),  # lost in the text: the default
    ("ade20k_swin_base", 1.0, (1.0, 0.2)),  # Swin on ADE20K: T = 1
    ("cocostuff10k_swin_base", 2.0, (1.0, 0.3)),  # not named for Swin: the default
    ("ade20k_fcn_resnet101", 2.0, (0.4, 0.1)),  # the default T = 2
    ("cocostuff10k_fcn_resnet101", 0.3, (1.0, 0.3)),  # "0.3 for FCN"
]


@pytest.mark.parametrize("name,length,weights", PAPER, ids=[p[0] for p in PAPER])
def test_paper_config_recipe(name, length, weights):
    config = load_config(name, None)
    assert config.model.cbp_length == length
    assert (config.loss.centroid_weight, config.loss.category_weight) == weights
    assert config.loss.ce_average == "all"  # mmseg's avg_non_ignore=False
    assert config.eval.dtype == "float32"


def test_paper_variant_selects_the_paper_s_choices_where_the_defaults_depart():
    """`:paper` on CamVid: the paper's object-level views instead of random pixels, nothing
    else moved; configs that do not depart are unchanged by it; a misspelt field fails."""
    from configs import common

    default, paper = load_config("camvid_mit_b0", None), load_config("camvid_mit_b0", "paper")
    assert (default.loss.views, paper.loss.views) == ("random_pixels", "objects")
    paper.loss.views = default.loss.views
    assert paper.to_dict() == default.to_dict()
    ade = load_config("ade20k_mit_b5", None)
    assert load_config("ade20k_mit_b5", "paper").to_dict() == ade.to_dict()
    with pytest.raises(ValueError, match="no field loss.viewz"):
        common.apply_variants(ade, "paper", paper={"loss.viewz": "objects"})
