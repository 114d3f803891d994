"""Alignment metrics on hand-checkable cases, the Table-5 baseline maps, and the table script."""

import pytest
import torch

from pisces_fast.eval import alignment as al
from pisces_fast.eval.alignment import (
    MAPPING_METHODS,
    fit_alignment_map,
    knn_indices,
    mutual_knn,
    spearman_structure,
    synthetic_paired_embeddings,
    vtm_accuracy,
)



pytestmark = pytest.mark.usefixtures("one_thread")  # one intra-op thread (tests/conftest.py)


def angles(*degrees):
    t = torch.tensor(degrees, dtype=torch.float64) * torch.pi / 180
    return torch.stack([t.cos(), t.sin()], dim=1)


def test_knn_by_cosine_excludes_self():
    x = angles(0, 10, 30, 100)
    assert knn_indices(x, 2).tolist() == [[1, 2], [0, 2], [1, 0], [2, 1]]
    # Scale does not matter for cosine neighbours.
    assert torch.equal(knn_indices(x * torch.tensor([[1.0], [5.0], [0.1], [2.0]], dtype=torch.float64), 2), knn_indices(x, 2))


def test_mutual_knn_hand_checked():
    a = angles(0, 10, 30, 100)
    assert mutual_knn(a, a, k=2) == 1.0
    # A rotation keeps every cosine: still perfect alignment, whatever the dimension of b.
    rot = torch.tensor([[0.6, -0.8], [0.8, 0.6]], dtype=torch.float64)
    assert mutual_knn(a, torch.cat([a @ rot, torch.zeros(4, 1, dtype=torch.float64)], 1), k=2) == 1.0
    # b: 0, 10, 100, 30  -> kNN_b: {1,3}, {0,3}, {3,1}, {1,0}; kNN_a: {1,2}, {0,2}, {1,0}, {2,1}
    # overlaps: 1, 1, 1, 1 of k=2 each -> 0.5
    b = angles(0, 10, 100, 30)
    assert mutual_knn(a, b, k=2) == pytest.approx(0.5)
    assert mutual_knn(a, b, k=3) == 1.0  # with k = n - 1 every neighbourhood is everyone else


def test_mutual_knn_unrelated_sets_is_near_chance():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(400, 16, generator=g), torch.randn(400, 16, generator=g)
    assert mutual_knn(a, b, k=10) < 0.06  # chance level is k/(n-1) = 0.025


def test_spearman_structure_hand_checked():
    before = torch.tensor([[0.0], [1.0], [3.0]])
    # Pair distances (01, 02, 12): before (1, 3, 2), after (3, 4, 1): ranks (1, 3, 2) vs (2, 3, 1)
    # Spearman = 1 - 6·Σd²/(n(n²-1)) = 1 - 6·2/24 = 0.5
    assert spearman_structure(before, torch.tensor([[0.0], [3.0], [4.0]])) == pytest.approx(0.5)
    x = torch.randn(30, 5)
    q, _ = torch.linalg.qr(torch.randn(5, 5))
    assert spearman_structure(x, 3 * x @ q + 1) == pytest.approx(1.0)  # similarity transform keeps all ranks
    assert spearman_structure(x, x, metric="cosine") == pytest.approx(1.0)
    y = torch.randn(30, 5)
    assert abs(spearman_structure(x, y)) < 0.2


def test_spearman_pair_subsampling_is_close_to_exact():
    x = torch.randn(200, 8)
    y = x + 0.5 * torch.randn(200, 8)
    exact = spearman_structure(x, y)
    sampled = spearman_structure(x, y, max_pairs=5000, seed=1)
    assert abs(exact - sampled) < 0.03


def test_vtm_accuracy_hand_checked():
    assert vtm_accuracy(torch.tensor([0.9, 0.4]), torch.tensor([0.2, 0.6])) == 0.5
    assert vtm_accuracy(torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0.1])) == 1.0
    assert vtm_accuracy(torch.tensor([0.5]), torch.tensor([0.5])) == 0.5  # 0.5 is "no match" (argmax tie)
    with pytest.raises(ValueError, match="probabilities"):
        vtm_accuracy(torch.tensor([1.5]), torch.tensor([0.1]))


def test_bad_inputs():
    a = torch.randn(10, 4)
    nan = a.clone()
    nan[2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        mutual_knn(nan, a)
    with pytest.raises(ValueError, match="paired"):
        mutual_knn(a, torch.randn(9, 4))
    with pytest.raises(ValueError, match=r"k must be an int in \[1, n-1\]"):
        mutual_knn(a, a, k=10)
    with pytest.raises(ValueError, match="same rows"):
        spearman_structure(a, torch.randn(11, 4))
    with pytest.raises(ValueError, match="undefined"):
        spearman_structure(a, torch.ones(10, 4))
    with pytest.raises(ValueError, match="method must be one of"):
        fit_alignment_map(a, a, "cosine")
    with pytest.raises(ValueError, match="same shape"):
        fit_alignment_map(a, torch.randn(10, 5), "l2")
    with pytest.raises(TypeError):
        mutual_knn(a.numpy(), a)


@pytest.mark.parametrize("method", MAPPING_METHODS)
def test_baseline_maps_learn_their_objective(method):
    g = torch.Generator().manual_seed(0)
    y = torch.randn(256, 8, generator=g)
    x = torch.tanh(y @ torch.randn(8, 8, generator=g)) + 0.5  # a paired, nonlinear relation
    untrained = fit_alignment_map(y, x, method, steps=1, hidden=32, lr=1e-9)
    trained = fit_alignment_map(y, x, method, steps=300, hidden=32)
    temperature = 0.07 if method == "contrastive" else 0.1
    before = float(al._mapping_loss(method, untrained(y), x, temperature))
    after = float(al._mapping_loss(method, trained(y), x, temperature))
    assert after < 0.5 * before, (before, after)


@pytest.fixture(scope="module")
def bench(load_repo_module):
    return load_repo_module("benchmarks/alignment_table.py")


def test_tables_print_on_synthetic_data(bench):
    text, video = synthetic_paired_embeddings(120, 8, latent_dim=4, seed=0)
    t5 = bench.table5(text, video, steps=20, ot_steps=10, hidden=16, k=5, progress=False)
    for label in ("No map", "Contrastive mapping", "Mapping w/ L2", "Mapping w/ KL", "OT (PISCES)", "Mutual KNN", "Spearman"):
        assert label in t5
    assert "| nan" not in t5.lower() and " nan" not in t5.lower()
    backbone, videos, prompts = bench.tiny_world(n=4)
    t8 = bench.table8(backbone, videos, prompts, backend="reference", progress=False)
    for label in ("Vanilla cross-attention", "Full OT (m=1.0)", "Partial OT (m=0.5)", "spatio-temporal (0.2, 0.2)", "VTM Acc."):
        assert label in t8
    assert len(t8.splitlines()) == 3 + 8  # title, header, rule, 8 variants


def test_benchmark_cli_reads_embedding_files(bench, tmp_path, capsys):
    from safetensors.torch import save_file

    text, video = synthetic_paired_embeddings(60, 6, latent_dim=3, seed=1)
    save_file({"text": text}, str(tmp_path / "t.safetensors"))
    save_file({"video": video}, str(tmp_path / "v.safetensors"))
    rc = bench.main(["--text", str(tmp_path / "t.safetensors"), "--video", str(tmp_path / "v.safetensors"),
                     "--steps", "5", "--ot-steps", "3", "--hidden", "8", "--k", "3", "--skip-table8", "--no-progress"])
    assert rc == 0
    assert "48 train / 12 held-out pairs, d=6" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError):
        bench.main(["--text", str(tmp_path / "missing.pt"), "--video", str(tmp_path / "v.safetensors"), "--skip-table8"])


def test_vtm_probabilities_with_explicit_negatives(bench):
    """Hard negatives: the mismatched pair of video i is (video i, negatives[i]); a negative list equal to
    another clip's prompts reproduces that clip's matched probability, and bad lists are refused."""
    from pisces_fast.rewards import vtm_probabilities

    backbone, videos, prompts = bench.tiny_world(n=4)
    variants = {"vanilla": None}
    rolled = prompts[1:] + prompts[:1]
    pos, neg = vtm_probabilities(backbone, videos, prompts, variants, negatives=rolled, progress=False)["vanilla"]
    assert pos.shape == neg.shape == (len(prompts),)
    # (video i, prompt i+1) scored directly: the same number as the mismatched entry.
    direct, _ = vtm_probabilities(backbone, videos, rolled, variants, negatives=prompts, progress=False)["vanilla"]
    torch.testing.assert_close(neg, direct, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="negatives: expected one caption per prompt"):
        vtm_probabilities(backbone, videos, prompts, variants, negatives=rolled[:-1], progress=False)
    with pytest.raises(ValueError, match="equals its video's prompt"):
        vtm_probabilities(backbone, videos, prompts, variants, negatives=list(prompts), progress=False)
    t8 = bench.table8(backbone, videos, prompts, backend="reference", negatives=rolled, title="hard", progress=False)
    assert t8.splitlines()[0].startswith("hard")
