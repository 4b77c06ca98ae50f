"""Model files are data: array steps equal scikit-learn's answers, and nothing in a file ever runs."""

import io
import json
import os
import subprocess
import sys
import zipfile

import joblib
import numpy as np
import pytest
import sklearn
from sklearn.base import clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import LinearSVC

from tl_embed.cli import main
from tl_embed.embedding.backbones import BackboneSpec
from tl_embed.errors import TlEmbedError
from tl_embed.heads.convert import steps_from_pipeline
from tl_embed.heads.fit import fit_head
from tl_embed.heads.head import Head
from tl_embed.heads.model_file import FORMAT, PICKLE_FORMAT
from tl_embed.heads.transforms import SignedPower

SPEC = BackboneSpec("synthetic", "random", "random", 32, "none", "avg", 16)


def data(classes: int, n: int = 120, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1, (classes, 16))
    y = rng.integers(0, classes, n)
    X = np.abs(centers[y] + rng.normal(0, 0.8, (n, 16)))  # non-negative, like pooled ReLU features
    return X.astype(np.float32), np.array([f"c{i}" for i in y])


PIPELINES = {
    "logreg": Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression(C=0.5))]),
    "logreg-sqrt": Pipeline([("power", SignedPower(0.5)), ("l2", Normalizer()), ("scale", StandardScaler()),
                             ("clf", LogisticRegression(C=0.5))]),
    "svm-ensemble": Pipeline([("scale", StandardScaler()),
                              ("clf", CalibratedClassifierCV(LinearSVC(C=0.1), method="sigmoid", cv=3))]),
    "svm-single": Pipeline([("scale", StandardScaler()), ("clf", CalibratedClassifierCV(
        LinearSVC(C=0.1), method="sigmoid", cv=3, ensemble=False))]),
    "knn-distance": Pipeline([("l2", Normalizer()), ("clf", KNeighborsClassifier(5, weights="distance"))]),
    "knn-uniform": Pipeline([("l2", Normalizer()), ("clf", KNeighborsClassifier(3))]),
}


@pytest.mark.parametrize("classes", [2, 4])
@pytest.mark.parametrize("name", PIPELINES)
def test_steps_compute_what_sklearn_computes(name, classes, tmp_path):
    X, y = data(classes)
    pipe = clone(PIPELINES[name]).fit(X[:90], y[:90])
    labels = sorted(set(y[:90]))
    head = Head(steps_from_pipeline(pipe, labels), labels, SPEC, name, {})
    head.save(tmp_path / "m.tlh")
    loaded = Head.load(tmp_path / "m.tlh")
    expected = pipe.predict_proba(X[90:])
    np.testing.assert_allclose(loaded.predict_proba(X[90:]), expected, atol=1e-6)
    assert (loaded.predict(X[90:]) == pipe.predict(X[90:])).all()


def test_model_file_is_json_and_plain_arrays(tmp_path):
    X, y = data(3)
    head, _ = fit_head(X, y, SPEC, "logreg")
    head.save(tmp_path / "m.tlh")
    with zipfile.ZipFile(tmp_path / "m.tlh") as z:
        meta = json.loads(z.read("head.json"))
        arrays = [n for n in z.namelist() if n != "head.json"]
        assert all(z.getinfo(n).compress_type == zipfile.ZIP_STORED for n in arrays)
    assert meta["format"] == FORMAT and meta["classes"] == ["c0", "c1", "c2"]
    assert [s["op"] for s in meta["steps"]] == ["dense"]  # standardisation folded into one softmax layer
    assert meta["versions"]["scikit-learn"] == sklearn.__version__
    assert sorted(arrays) == ["steps/0/W.npy", "steps/0/b.npy"]


class Boom:
    """Unpickling this runs code: it creates the file named in its argument."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_an_old_pickle_file_is_refused_without_running_it(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.tlh"
    joblib.dump({"format": PICKLE_FORMAT, "pipeline": Boom(marker)}, evil)
    with pytest.raises(TlEmbedError, match="--trust-pickle"):
        Head.load(evil)
    assert main(["predict", str(evil), str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "old pickle model file" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()


def test_a_zip_with_a_pickled_array_is_refused_without_running_it(tmp_path):
    X, y = data(2)
    head, _ = fit_head(X, y, SPEC, "logreg")
    head.save(tmp_path / "m.tlh")
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.array([Boom(marker)], dtype=object), allow_pickle=True)
    tampered = tmp_path / "tampered.tlh"
    with zipfile.ZipFile(tmp_path / "m.tlh") as src, zipfile.ZipFile(tampered, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, buf.getvalue() if name.endswith("W.npy") else src.read(name))
    with pytest.raises(TlEmbedError, match="not a readable tl_embed model file"):
        Head.load(tampered)
    assert not marker.exists()


def test_bad_shapes_and_unknown_ops_and_newer_formats_are_refused(tmp_path):
    X, y = data(2)
    head, _ = fit_head(X, y, SPEC, "logreg")
    head.save(tmp_path / "m.tlh")

    def rewrite(name, edit):
        with zipfile.ZipFile(tmp_path / "m.tlh") as src, zipfile.ZipFile(tmp_path / name, "w") as dst:
            for member in src.namelist():
                body = src.read(member)
                if member == "head.json":
                    meta = json.loads(body)
                    edit(meta)
                    body = json.dumps(meta).encode()
                dst.writestr(member, body)
        return tmp_path / name

    with pytest.raises(TlEmbedError, match="upgrade tl_embed"):
        Head.load(rewrite("newer.tlh", lambda m: m.update(format="tl_embed.head/9")))
    with pytest.raises(TlEmbedError, match="unknown head operation 'exec'"):
        Head.load(rewrite("op.tlh", lambda m: m["steps"][0].update(op="exec")))
    with pytest.raises(TlEmbedError, match="2 outputs for 3 classes"):
        Head.load(rewrite("classes.tlh", lambda m: m.update(classes=["a", "b", "c"])))
    with pytest.raises(TlEmbedError, match="do not take 32 inputs"):
        Head.load(rewrite("dim.tlh", lambda m: m["spec"].update(dim=32)))


def test_a_trusted_old_pickle_loads_and_reports_a_version_mismatch(tmp_path):
    X, y = data(3)
    pipe = clone(PIPELINES["logreg"]).fit(X, y)
    old = tmp_path / "old.tlh"
    joblib.dump({"format": PICKLE_FORMAT, "pipeline": pipe, "classes": ["c0", "c1", "c2"], "spec": SPEC.to_dict(),
                 "head": "logreg", "params": {"C": 0.5}, "metrics": {},
                 "versions": {"scikit-learn": "0.0.1"}}, old)
    with pytest.warns(UserWarning, match="scikit-learn 0.0.1"):
        head = Head.load(old, trust_pickle=True)
    np.testing.assert_allclose(head.predict_proba(X), pipe.predict_proba(X), atol=1e-6)


def test_predicting_from_a_model_file_does_not_import_sklearn(tmp_path):
    X, y = data(3)
    head, _ = fit_head(X, y, SPEC, "svm")
    head.save(tmp_path / "m.tlh")
    np.save(tmp_path / "x.npy", X)
    code = ("import sys, numpy as np; from tl_embed.heads.head import Head; "
            f"h = Head.load({str(tmp_path / 'm.tlh')!r}); p = h.predict_proba(np.load({str(tmp_path / 'x.npy')!r})); "
            "print(p.shape, 'sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "(120, 3) False"


def test_cli_predicts_with_a_trusted_old_pickle_and_warns_in_one_line(tmp_path):
    X, y = data(3)
    pipe = clone(PIPELINES["logreg"]).fit(X, y)
    old = tmp_path / "old.tlh"
    joblib.dump({"format": PICKLE_FORMAT, "pipeline": pipe, "classes": ["c0", "c1", "c2"], "spec": SPEC.to_dict(),
                 "head": "logreg", "params": {}, "metrics": {}, "versions": {"scikit-learn": "0.0.1"}}, old)
    store = tmp_path / "s.tle"
    from tl_embed.embedding.store import EmbeddingStore, ManifestRow

    with EmbeddingStore.create(store, SPEC) as s:
        s.add([ManifestRow(f"{c}/{i}.jpg", c, None, "h", 1, 1, 1, 1) for i, c in enumerate(y)], X)
    run = subprocess.run([sys.executable, "-m", "tl_embed.cli", "predict", str(old), str(store), "--format", "json",
                          "--trust-pickle"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert [r["label"] for r in json.loads(run.stdout)] == list(pipe.predict(X))
    warning = [line for line in run.stderr.splitlines() if "warning" in line]
    assert len(warning) == 1 and warning[0].startswith("tl-embed: warning:") and "scikit-learn 0.0.1" in warning[0]
