"""Bad arguments to vidkern.nn modules: a named TypeError/ValueError at construction or before
any op runs in forward (never a ZeroDivisionError, an unpack or matmul error, or a silent NaN)."""
import pytest
import torch

from vidkern import dispatch
from vidkern.nn import (STTM, TEAM, Block, DropPath, GroupAveragedClassifier, HSDAttention, Mlp,
                        TokenGroupInteraction)

GRID = (2, 3, 3)
BUILDERS = {
    "HSDAttention": lambda **kw: HSDAttention(**{"dim": 32, "num_heads": 4, "grid": GRID, **kw}),
    "TokenGroupInteraction": lambda **kw: TokenGroupInteraction(**{"dim": 48, "grid": GRID, "num_groups": 4, **kw}),
    "GroupAveragedClassifier": lambda **kw: GroupAveragedClassifier(**{"dim": 16, "num_classes": 5, "grid": GRID,
                                                                       **kw}),
    "TEAM": lambda **kw: TEAM(**{"dim": 16, "ratios": (0.25, 0.5, 0.75), **kw}),
    "STTM": lambda **kw: STTM(**{"dim": 16, "num_out": 4, **kw}),
    "Block": lambda **kw: Block(**{"dim": 32, "num_heads": 4, "grid": GRID, **kw}),
    "DropPath": lambda **kw: DropPath(**{"p": 0.1, **kw}),
    "Mlp": lambda **kw: Mlp(**{"dim": 16, "hidden": 32, **kw}),
}

BAD_ARGUMENTS = [
    # (module, bad keyword arguments, exception, message naming the argument)
    ("HSDAttention", dict(num_heads=0), ValueError, "num_heads must be a positive int, got 0"),
    ("HSDAttention", dict(num_heads=-2), ValueError, "num_heads must be a positive int, got -2"),
    ("HSDAttention", dict(num_heads=2.0), TypeError, "num_heads must be a positive int"),
    ("HSDAttention", dict(dim=0), ValueError, "dim must be a positive int"),
    ("HSDAttention", dict(head_dim=0), ValueError, "head_dim must be a positive int"),
    ("HSDAttention", dict(num_global_heads=5), ValueError, r"num_global_heads must be in \[0, 4\]"),
    ("HSDAttention", dict(pattern="diagonal"), ValueError, "pattern must be one of"),
    ("HSDAttention", dict(pattern=torch.zeros(17, dtype=torch.long)), ValueError,
     r"pattern tensor must have shape \(N,\) = \(18,\)"),
    ("HSDAttention", dict(pattern=torch.zeros(18)), TypeError, "pattern tensor must have an integer dtype"),
    ("HSDAttention", dict(grid=(2, 0, 3)), ValueError, "grid must have positive entries"),
    ("HSDAttention", dict(backend="cudnn"), ValueError, "backend must be one of"),
    ("HSDAttention", dict(backend=3), TypeError, "backend must be None or one of"),
    ("HSDAttention", dict(proj_drop=1.5), ValueError, r"proj_drop must be a probability in \[0, 1\]"),
    ("HSDAttention", dict(qk_scale=float("nan")), ValueError, "qk_scale must be a finite float"),
    ("HSDAttention", dict(dim_out=0), ValueError, "dim_out must be a positive int"),
    ("TokenGroupInteraction", dict(num_groups=0), ValueError, "num_groups must be a positive int, got 0"),
    ("TokenGroupInteraction", dict(num_groups=5), ValueError, "must be a positive multiple of num_groups"),
    ("TokenGroupInteraction", dict(dim=3), ValueError, r"dim // reduction = 3 // 4 = 0"),
    ("TokenGroupInteraction", dict(reduction=0), ValueError, "reduction must be a positive int"),
    ("GroupAveragedClassifier", dict(num_classes=0), ValueError, "num_classes must be a positive int"),
    ("GroupAveragedClassifier", dict(pattern="rows"), ValueError, "pattern must be one of"),
    ("GroupAveragedClassifier", dict(pattern=torch.tensor([0, -1] * 9)), ValueError, "non-negative group ids"),
    ("GroupAveragedClassifier", dict(combine="sum"), ValueError, "combine must be 'concat' or 'mean'"),
    ("GroupAveragedClassifier", dict(grid=None), ValueError, "grid is required with combine='concat'"),
    ("GroupAveragedClassifier", dict(head_dropout=-0.1), ValueError, "head_dropout must be a probability"),
    ("GroupAveragedClassifier", dict(eps=0.0), ValueError, "eps must be a finite positive float"),
    ("TEAM", dict(dim=0), ValueError, "dim must be a positive int"),
    ("TEAM", dict(ratios=(0.2, 0.4)), ValueError, r"ratios must be \(r1, r2, r3\)"),
    ("TEAM", dict(ratios=(0.2, -0.4, 0.6)), ValueError, r"ratios\[1\] must be a finite positive float"),
    ("TEAM", dict(backend="fast"), ValueError, "backend must be one of"),
    ("STTM", dict(num_out=0), ValueError, "num_out must be a positive int"),
    ("STTM", dict(num_out=None, merge_ratio=float("nan")), ValueError, "merge_ratio must be a finite float"),
    ("STTM", dict(num_out=None, merge_ratio=1.0), ValueError, r"merge_ratio must be in \[0, 1\)"),
    ("STTM", dict(backend="gpu"), ValueError, "backend must be one of"),
    ("Block", dict(num_heads=0), ValueError, "num_heads must be a positive int, got 0"),
    ("Block", dict(num_heads=-4), ValueError, "num_heads must be a positive int, got -4"),
    ("Block", dict(attention="local"), ValueError, "attention must be one of"),
    ("Block", dict(token_group_interaction=True, tgi_groups=0), ValueError, "num_groups must be a positive int, got 0"),
    ("Block", dict(mlp_ratio=0.0), ValueError, "mlp_ratio must be a finite positive float"),
    ("Block", dict(mlp_ratio=0.01), ValueError, "mlp_ratio=0.01 gives an empty MLP"),
    ("Block", dict(drop_path=2.0), ValueError, r"p must be a probability in \[0, 1\]"),
    ("Block", dict(backend="tpu"), ValueError, "backend must be one of"),
    ("Block", dict(team_ratios=(0.5,)), ValueError, r"ratios must be \(r1, r2, r3\)"),
    ("DropPath", dict(p=-0.5), ValueError, r"p must be a probability in \[0, 1\], got -0.5"),
    ("DropPath", dict(p=float("inf")), ValueError, "p must be a finite float"),
    ("Mlp", dict(hidden=0), ValueError, "hidden must be a positive int"),
]


@pytest.mark.parametrize("module,kw,exc,match", BAD_ARGUMENTS,
                         ids=[f"{m}-{','.join(kw)}-{i}" for i, (m, kw, _, _) in enumerate(BAD_ARGUMENTS)])
def test_constructor_rejects_bad_arguments_by_name(module, kw, exc, match):
    with pytest.raises(exc, match=match):
        BUILDERS[module](**kw)


def test_every_registered_backend_and_none_are_accepted():
    for name in [None] + dispatch.names():
        assert HSDAttention(32, 4, GRID, backend=name).backend == name


FORWARDS = {   # module -> (a call with the right input, the width D it takes)
    "HSDAttention": (lambda m, x: m(x), 32),
    "TokenGroupInteraction": (lambda m, x: m(x), 48),
    "GroupAveragedClassifier": (lambda m, x: m(x), 16),
    "TEAM": (lambda m, x: m(x), 16),
    "STTM": (lambda m, x: m(x, torch.randn(1, 18, 16)), 16),
    "Block": (lambda m, x: m(x), 32),
    "Mlp": (lambda m, x: m(x), 16),
}


@pytest.mark.parametrize("module", sorted(FORWARDS))
def test_forward_names_a_wrong_rank_or_width(module):
    call, dim = FORWARDS[module]
    m = BUILDERS[module]()
    call(m, torch.randn(2, 18, dim))                                        # the right input runs
    with pytest.raises(ValueError, match=rf"x must have shape \(B, [NL], D\) \(3 dims\), got \(18, {dim}\)"):
        call(m, torch.randn(18, dim))
    with pytest.raises(ValueError, match=rf"x must have shape \(B, [NL], D\) with D={dim} .*got \(2, 18, {dim + 1}\)"):
        call(m, torch.randn(2, 18, dim + 1))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        call(m, [[0.0] * dim])


@pytest.mark.parametrize("module", ["TokenGroupInteraction", "GroupAveragedClassifier", "Block"])
def test_forward_names_a_grid_that_does_not_fit_the_tokens(module):
    call, dim = FORWARDS[module]
    m = BUILDERS[module]()
    with pytest.raises(ValueError, match=r"number of tokens N=20 must equal T\*Hp\*Wp = 2\*3\*3 = 18"):
        call(m, torch.randn(2, 20, dim))


def test_tgi_without_any_grid_says_where_to_give_it():
    with pytest.raises(ValueError, match="grid .* is required: pass it to the module's constructor or to forward"):
        TokenGroupInteraction(48, num_groups=4)(torch.randn(2, 18, 48))


def test_group_averaged_classifier_refuses_a_grid_with_another_group_count():
    """Built for the checkerboard's G=2 on (2, 3, 3); a 1x1 spatial grid has G=1 (and group_mean
    with the fixed G=2 would average an empty group: NaN)."""
    head = GroupAveragedClassifier(16, 5, grid=GRID)
    with pytest.raises(ValueError, match=r"grid=\(4, 1, 1\) gives G=1 'checkerboard' groups, but this classifier's "
                                         r"head \(combine='concat'\) was built for num_groups=2"):
        head(torch.randn(2, 4, 16), grid=(4, 1, 1))
    temporal = GroupAveragedClassifier(16, 5, grid=GRID, pattern="temporal")
    with pytest.raises(ValueError, match="gives G=4 'temporal' groups.*built for num_groups=9"):
        temporal(torch.randn(2, 8, 16), grid=(2, 2, 2))
    assert head(torch.randn(2, 8, 16), grid=(2, 2, 2)).shape == (2, 5)     # another grid with G=2 is fine
    mean = GroupAveragedClassifier(16, 5, grid=GRID, pattern="temporal", combine="mean")
    out = mean(torch.randn(2, 8, 16), grid=(2, 2, 2))                       # "mean" takes any G
    assert out.shape == (2, 5) and torch.isfinite(out).all()


def test_drop_path_of_one_drops_the_branch_instead_of_returning_nan():
    drop = DropPath(1.0).train()
    x = torch.randn(4, 6, 8)
    assert torch.equal(drop(x), torch.zeros_like(x))        # the branch contributes nothing: x + 0
    blk = Block(32, 4, GRID, drop_path=1.0).train()
    x = torch.randn(2, 18, 32, requires_grad=True)
    out = blk(x)
    assert torch.equal(out, x)                              # every residual branch dropped: the identity
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    half = DropPath(0.5).train()(torch.ones(1000, 1))
    assert set(half.flatten().tolist()) <= {0.0, 2.0}       # kept samples are scaled by 1 / (1 - p)
