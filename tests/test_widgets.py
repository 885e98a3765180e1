"""The conflict explorer and the partition editor: a thin view that drives an `EditSession`."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from merit_lab.analysis.conflict import compute_conflict_space
from merit_lab.io import read_json
from merit_lab.partition.gain import predict_gain
from merit_lab.partition.methods import split_balanced, split_random
from merit_lab.partition.plan import Partition
from merit_lab.partition.session import EditSession, place_by_projection, subset_counts
from merit_lab.viz.editor import PartitionEditor
from merit_lab.viz.explorer import ConflictExplorer

T, D = 12, 40


@pytest.fixture(scope="module")
def world():
    """Twelve sources around three gradient directions (families a, b, c), with counts."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, D))
    rows = np.stack([centres[i % 3] + 0.6 * rng.normal(size=D) for i in range(T)])
    names = [f"s{i:02d}" for i in range(T)]
    example_tokens = {
        s: rng.integers(5, 60, size=int(rng.integers(20, 200))).tolist() for s in names
    }
    table = pd.DataFrame(
        {
            "source": names,
            "family": ["abc"[i % 3] for i in range(T)],
            "examples": [len(example_tokens[s]) for s in names],
            "tokens": [sum(example_tokens[s]) for s in names],
        }
    ).set_index("source", drop=False)
    return SimpleNamespace(
        rows=rows,
        names=names,
        table=table,
        centres=centres,
        example_tokens=example_tokens,
        space=compute_conflict_space(rows, names),
    )


def counts(w, col):
    return {s: int(v) for s, v in w.table[col].items()}


def independent_stats(part, w):
    """Group statistics straight from the rows, with numpy only."""
    unit = w.rows / np.linalg.norm(w.rows, axis=1, keepdims=True)
    cos = unit @ unit.T
    pos = {s: i for i, s in enumerate(w.names)}
    out = []
    total = sum(part.tokens.values())
    for g in part.groups:
        idx = [pos[s] for s in g]
        others = [pos[s] for s in part.sources if s not in g]
        pairs = [cos[i, j] for a, i in enumerate(idx) for j in idx[a + 1 :]]
        out.append(
            {
                "tokens": sum(part.tokens[s] for s in g),
                "weight": sum(part.tokens[s] for s in g) / total,
                "cohesion": np.mean(pairs) if pairs else np.nan,
                "conflict": np.mean([cos[i, j] for i in idx for j in others]),
            }
        )
    return pd.DataFrame(out)


def assert_stats_match(editor, w):
    stats, ref = editor.stats, independent_stats(editor.partition, w)
    assert stats["weight"].sum() == pytest.approx(1.0)
    for col in ("tokens", "weight", "cohesion", "conflict"):
        np.testing.assert_allclose(stats[col].to_numpy(float), ref[col].to_numpy(float), atol=1e-9)
    gain = predict_gain(editor.partition, w.rows, w.names)
    assert stats["gain"].sum() == pytest.approx(gain, rel=1e-9)
    assert editor.summary["gain"] == pytest.approx(gain, rel=1e-12)
    for g, row in stats.iterrows():  # the displayed table shows the same numbers
        assert f"<td>{int(row['tokens']):,}</td>" in editor.stats_html.value, g


# -- conflict explorer -----------------------------------------------------------------------


def test_explorer_heatmap_dendrogram_and_hover(world):
    from scipy.cluster.hierarchy import dendrogram, linkage
    from scipy.spatial.distance import squareform

    ex = ConflictExplorer(world.space, world.table)
    order = list(world.space.order)
    heat = ex.heatmap.data[-1]
    np.testing.assert_allclose(np.asarray(heat.z), world.space.cosine[np.ix_(order, order)])
    assert list(heat.customdata) == [world.names[i] for i in order]
    # The dendrogram's leaves are the heatmap's columns (same linkage as space.order).
    link = linkage(
        squareform(1 - world.space.cosine, checks=False), "average", optimal_ordering=True
    )
    assert dendrogram(link, no_plot=True)["leaves"] == order
    assert ex.heatmap.data[0].name == "dendrogram"
    a, b = world.names[order[0]], world.names[order[1]]
    cell = heat.text[0][1]
    assert a in cell and b in cell and f"{world.space.cosine[order[0], order[1]]:+.3f}" in cell
    row = world.table.loc[a]
    assert f"family: {row['family']}" in cell and f"examples: {row['examples']}" in cell
    assert f"tokens: {row['tokens']}" in cell
    np.testing.assert_allclose(ex.variance.data[0].y, world.space.explained_variance_ratio[:10])


def test_explorer_scatter_colour_and_dims(world):
    ex = ConflictExplorer(world.space, world.table)
    assert ex.color.value == "family"
    assert [t.name for t in ex.scatter.data] == ["a", "b", "c"]
    z = world.space.coords(2)
    a_rows = [i for i in range(T) if i % 3 == 0]
    np.testing.assert_allclose(ex.scatter.data[0].x, z[a_rows, 0])
    ex.color.value = "tokens"  # 12 distinct numbers: one trace on a continuous scale
    assert len(ex.scatter.data) == 1
    np.testing.assert_array_equal(ex.scatter.data[0].marker.color, world.table["tokens"])
    ex.color.value = ex.NONE
    ex.dims.value = 3
    assert {t.type for t in ex.scatter.data} == {"scatter3d"}
    np.testing.assert_allclose(ex.scatter.data[0].z, world.space.coords(3)[:, 2])
    assert "Conflict space" in ex.scatter.layout.title.text


def test_explorer_allies_and_conflicts(world):
    ex = ConflictExplorer(world.space, world.table)
    allies, conflicts = ex.allies_and_conflicts("s04", n=3)
    cos = world.space.cosine[world.space.index("s04")].copy()
    cos[world.space.index("s04")] = np.nan
    order = np.argsort(-np.nan_to_num(cos, nan=-9))
    assert allies["source"].tolist() == [world.names[i] for i in order[:3]]
    assert conflicts["source"].tolist() == [
        world.names[i] for i in np.argsort(np.nan_to_num(cos, nan=9))[:3]
    ]
    np.testing.assert_allclose(allies["cosine"], cos[order[:3]])
    assert set(allies["family"]) == {"b"}  # s04 is family b: its allies are the other b's
    ex.source.value = "s04"
    assert allies["source"][0] in ex.panel.value and conflicts["source"][0] in ex.panel.value


# -- partition editor ------------------------------------------------------------------------


def editor(w, **kwargs) -> PartitionEditor:
    """The editor's space form: it builds its own session from the table."""
    return PartitionEditor(w.space, w.table, rows=w.rows, example_tokens=w.example_tokens, **kwargs)


def without_times(part: Partition) -> dict:
    doc = part.to_dict()
    doc["edit_log"] = [{k: v for k, v in e.items() if k != "at"} for e in doc["edit_log"]]
    return doc


def test_editor_starts_balanced_and_stats_match_numpy(world):
    ed = editor(world, user="alice")
    ref = split_balanced(world.space, counts(world, "examples"), counts(world, "tokens"), r=1)
    assert ed.partition.groups == ref.groups
    assert list(ed.target.options) == [("G0", 0), ("G1", 1)]
    assert_stats_match(ed, world)
    assert ed.widget.children  # something to display
    assert ed.add_button.disabled and ed.add_source.options == ()  # every source is placed


def test_editor_is_a_view_of_its_session(world):
    part = split_balanced(world.space, counts(world, "examples"), counts(world, "tokens"), r=1)
    session = EditSession(part, world.space, example_tokens=world.example_tokens, rows=world.rows)
    ed = PartitionEditor(session, world.table)
    assert ed.session is session and ed.partition is part
    session.move(part.groups[0][0], 1)  # an edit made on the session...
    assert ed.partition is session.partition  # ...is what the editor shows after a redraw
    assert ed.undo() and session.partition is part
    with pytest.raises(TypeError, match="rows"):
        PartitionEditor(session, rows=world.rows)
    bare = PartitionEditor(session)  # no table: the hover shows the session's own counts
    assert bare.table.loc[part.groups[1][0], "examples"] == part.examples[part.groups[1][0]]


def test_editor_method_widget_resplits(world):
    ed = editor(world, user="alice")
    before = ed.stats
    ed.method.value = "random"
    ref = split_random(world.names, counts(world, "examples"), counts(world, "tokens"), k=2, seed=0)
    assert ed.partition.method == "random" and ed.partition.groups == ref.groups
    assert not ed.stats.equals(before)
    assert_stats_match(ed, world)
    ed.size_by.value = "k"
    ed.k.value = 3
    assert ed.partition.k == 3 and len(ed.target.options) == 3
    ed.seed.value = 5
    assert ed.partition.params["seed"] == 5
    assert_stats_match(ed, world)
    assert [e["op"] for e in ed.partition.edit_log] == ["split"] * 4


def test_editor_refuses_impossible_split(world):
    ed = editor(world)
    before = ed.partition
    assert not ed.split("balanced", r=T)
    assert ed.partition is before and "split refused" in ed.status.value


def test_move_by_widgets_then_save_writes_edit_log(world, tmp_path):
    path = tmp_path / "partition.json"
    ed = editor(world, path=path, user="alice")
    src = ed.partition.groups[0][0]
    ed.source.value = src
    ed.target.value = 1
    ed.move_button.click()
    assert ed.partition.group_of(src) == 1
    assert "moved" in ed.status.value and src in ed.status.value
    assert_stats_match(ed, world)
    assert ed.table.loc[src, "group"] == "G1"
    ed.save_button.click()
    assert "saved" in ed.status.value
    doc = read_json(path)
    assert src in doc["groups"][1] and sum(doc["weights"]) == pytest.approx(1.0)
    entry = doc["edit_log"][-1]
    assert (entry["op"], entry["source"], entry["from"], entry["to"]) == ("move", src, 0, 1)
    assert entry["who"] == "alice" and entry["at"]
    assert Partition.load(path).groups == ed.partition.groups
    # Reopening the file continues from the hand-edited partition.
    again = PartitionEditor(world.space, world.table, path=path)
    assert again.partition.groups == ed.partition.groups


def test_move_that_empties_a_group_is_refused(world):
    names = world.names
    part = Partition(
        "manual",
        (tuple(names[:1]), tuple(names[1:])),
        counts(world, "examples"),
        counts(world, "tokens"),
    )
    ed = editor(world, partition=part)
    stats_before, html_before = ed.stats, ed.stats_html.value
    ed.source.value = names[0]
    ed.target.value = 1
    ed.move_button.click()
    assert "empty" in ed.status.value and "move refused" in ed.status.value
    assert ed.partition is part and not ed.history
    pd.testing.assert_frame_equal(ed.stats, stats_before)
    assert ed.stats_html.value == html_before
    assert not ed.drop(names[0]) and ed.partition is part
    assert "drop refused" in ed.status.value
    # A selection that includes the lone source is refused whole.
    assert not ed.move_sources([names[0], names[5]], 1) and ed.partition is part


def test_undo_restores_previous_partitions(world):
    ed = editor(world)
    p0 = ed.partition
    src = p0.groups[0][0]
    ed.move(src, 1)
    p1 = ed.partition
    ed.method.value = "kmeans"
    assert ed.partition.method == "kmeans"
    ed.undo_button.click()
    assert ed.partition is p1 and ed.method.value == "balanced"
    ed.undo_button.click()
    assert ed.partition is p0
    assert not ed.undo() and "nothing to undo" in ed.status.value


def test_selection_moves_selected_sources(world):
    ed = editor(world)
    trace = ed.scatter.data[0]
    assert list(trace.customdata) == world.names
    np.testing.assert_allclose(trace.x, world.space.coords(2)[:, 0])
    picked = [i for i, s in enumerate(world.names) if ed.partition.group_of(s) == 0][:2]
    ed.target.value = 1
    ed._on_selection(trace, SimpleNamespace(point_inds=picked), None)
    assert all(ed.partition.group_of(world.names[i]) == 1 for i in picked)
    assert len(ed.history) == 1  # one undo step for the whole selection
    assert [e["op"] for e in ed.partition.edit_log] == ["move", "move"]


def test_drop_and_downweight_by_widgets_equal_session_edits(world, tmp_path):
    part = split_balanced(world.space, counts(world, "examples"), counts(world, "tokens"), r=1)
    session = EditSession(
        part, world.space, example_tokens=world.example_tokens, seed=3, rows=world.rows, user="bob"
    )
    ed = PartitionEditor(
        EditSession(
            part,
            world.space,
            example_tokens=world.example_tokens,
            seed=3,
            rows=world.rows,
            user="bob",
        ),
        world.table,
    )
    gone, light = part.groups[0][0], part.groups[1][0]
    ed.source.value = gone
    ed.drop_button.click()
    session.drop(gone)
    assert without_times(ed.partition) == without_times(session.partition)
    assert gone not in ed.partition.tokens and ed.dropped == (gone,)
    assert ed.table.loc[gone, "group"] == "dropped"
    assert gone not in [v for _, v in ed.source.options]
    assert ed.add_source.options == ((f"{gone} (dropped)", gone),)
    ed.source.value = light
    ed.factor.value = 0.25  # the former name of the fraction widget
    assert ed.fraction.value == 0.25
    ed.downweight_button.click()
    session.downweight(light, 0.25)
    assert without_times(ed.partition) == without_times(session.partition)
    n_ex, n_tok = subset_counts(light, world.example_tokens[light], 0.25, seed=3)
    assert n_ex == round(0.25 * len(world.example_tokens[light]))
    assert (ed.partition.examples[light], ed.partition.tokens[light]) == (n_ex, n_tok)
    assert dict(ed.partition.fractions) == {light: 0.25}
    assert f"down-weighted {light} to 0.25" in ed.status.value
    assert_stats_match(ed, world)
    marker, text = ed.scatter.data[0].marker, ed.scatter.data[0].text
    assert marker.symbol[world.names.index(gone)] == "x"
    assert marker.symbol[world.names.index(light)] == "circle-open"
    assert "fraction: 0.25" in text[world.names.index(light)]
    assert "dropped" in ed.stats_html.value and f"{light} ×0.25" in ed.stats_html.value
    doc = read_json(ed.save(tmp_path / "p.json"))
    assert doc["dropped"] == [gone] and doc["fractions"] == {light: 0.25}
    assert [e["op"] for e in doc["edit_log"]] == ["drop", "downweight"]
    # Re-splitting keeps the curation: the dropped source stays out, the fraction stays.
    ed.method.value = "random"
    assert gone not in ed.partition.tokens and ed.partition.tokens[light] == n_tok
    assert ed.scatter.data[0].marker.symbol[world.names.index(gone)] == "x"


def test_downweight_without_example_tokens_is_refused(world):
    ed = PartitionEditor(world.space, world.table, rows=world.rows)
    before = ed.partition
    assert not ed.downweight(world.names[0], 0.5)
    assert "down-weight refused" in ed.status.value and "per-example" in ed.status.value
    assert not ed.downweight(world.names[0], 1.5)
    assert ed.partition is before and not ed.history


def test_add_control_places_an_unplaced_source_by_projection(world, tmp_path):
    names = world.names
    fam = {s: world.table.loc[s, "family"] for s in names}
    new = names[-1]  # in the space (it has a gradient) but in no group yet
    part = Partition(
        "manual",
        tuple(tuple(s for s in names[:-1] if fam[s] == f) for f in "abc"),
        {s: counts(world, "examples")[s] for s in names[:-1]},
        {s: counts(world, "tokens")[s] for s in names[:-1]},
    )
    path = tmp_path / "partition.json"
    ed = editor(world, partition=part, path=path)
    assert ed.unplaced == (new,) and ed.table.loc[new, "group"] == "unplaced"
    assert ed.scatter.data[0].marker.symbol[names.index(new)] == "diamond-open"
    ed.save_button.click()  # blocked: the new source is neither placed nor dropped
    assert "save refused" in ed.status.value and not path.exists()
    assert ed.add_source.options == ((f"{new} (unplaced)", new),) and not ed.add_button.disabled
    assert ed.add_to.value == -1  # by projection
    ed.add_button.click()
    expect = place_by_projection(world.space, part, new)
    assert expect == 2  # s11 is family c
    assert ed.partition.group_of(new) == expect
    assert f"added {new} to G{expect} (projection)" in ed.status.value
    assert ed.add_button.disabled and ed.validate() == []
    ed.undo()
    ed.add_to.value = 0
    ed.add_button.click()
    assert ed.partition.group_of(new) == 0 and "(by hand)" in ed.status.value
    ed.save_button.click()
    assert "saved" in ed.status.value and new in read_json(path)["groups"][0]


def test_explorer_example_cloud_and_editor_example_drops_and_stability(world):
    from merit_lab.analysis.examples import ExampleSketches, dots_to_rows, resketch, weighted_mean
    from merit_lab.partition.stability import bootstrap_split_stability

    rng = np.random.default_rng(3)
    names = world.names[:4]
    rows = np.vstack([world.rows[i] + 0.8 * rng.normal(size=(10, D)) for i in range(4)])
    rows[3] = -world.rows[0]  # an example of s00 pointing against it
    tokens = rng.integers(3, 20, size=40)
    sources = [n for n in names for _ in range(10)]
    bank = np.stack(
        [
            weighted_mean(rows[i * 10 : (i + 1) * 10], tokens[i * 10 : (i + 1) * 10])
            for i in range(4)
        ]
    )
    dots, norms = dots_to_rows(rows, bank)
    sk = ExampleSketches(
        sources=sources,
        ids=[f"e{i}" for i in range(40)],
        tokens=tokens,
        dots=dots,
        norms=norms,
        bank_names=names,
        bank_norms=np.linalg.norm(bank, axis=1),
        rows=resketch(rows, 16),
        texts=[f"example text {i}" for i in range(40)],
    )
    space = compute_conflict_space(bank, names)
    explorer = ConflictExplorer(space, world.table)
    assert explorer.cloud.layout.display == "none"
    explorer.set_examples(sk.table(space))
    assert list(explorer.cloud.options) == ["(none)", *names]
    explorer.cloud.value = "s00"
    traces = {t.name: t for t in explorer.scatter.data}
    assert (
        len(traces["examples of s00"].x) == 9
        and len(traces["outlier examples (point away from their source)"].x) == 1
    )
    assert "example text 3" in traces["outlier examples (point away from their source)"].text[0]

    counts = {n: 10 for n in names}
    stab = bootstrap_split_stability(
        sk.rows, tokens, sources, names, examples=counts, train_tokens=counts, rs=(1,), n_boot=10
    )
    part = split_balanced(space, counts, counts, r=1)
    session = EditSession(
        part,
        space,
        example_tokens={n: [5] * 10 for n in names},
        train_ids={n: [f"e{i}" for i in range(j * 10, j * 10 + 10)] for j, n in enumerate(names)},
    )
    ed = PartitionEditor(session, stability=stab)
    assert "ARI" in ed.stability_html.value
    ed.source.value = "s00"
    ed.example_ids.value = "e3, e5"
    ed.drop_examples_button.click()
    assert ed.partition.excluded == {"s00": ("e3", "e5")} and ed.partition.examples["s00"] == 8
    assert "dropped 2 example(s)" in ed.status.value
    assert ed.undo() and ed.partition.examples["s00"] == 10
