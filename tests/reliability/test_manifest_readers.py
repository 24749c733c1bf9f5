"""The schema is the only reader of manifests (issue 29, class 8's second half).

Product code reads a loaded bundle through ``Bundle``'s accessors, which read the checked
document (``bundle.doc``); it never subscripts ``bundle.manifest``, ``manifest["..."]`` or
``manifest.get(...)``, nor json-loads a manifest.json of its own. Checked on the source (a
read put back anywhere fails, and the check itself is shown to see one), and the accessors
that replaced the reads give back what the export wrote (hypothesis).
"""
from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from rmt_runtime import Bundle

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("runtime", "export", "samples", "benchmarks", "scripts")
# The schema and the bundle read manifests; the exporter writes them.
READERS = {"runtime/bundle.py", "runtime/schema.py", "export/exporter.py"}
# Files still reading a manifest by hand: none. A file must never gain one.
PENDING: set[str] = set()


def _is_manifest(node: ast.AST) -> bool:
    """``manifest`` or ``<anything>.manifest``."""
    return (isinstance(node, ast.Name) and node.id == "manifest") or (
        isinstance(node, ast.Attribute) and node.attr == "manifest")


def _names_manifest_file(node: ast.AST) -> bool:
    return any((isinstance(n, ast.Constant) and n.value == "manifest.json") or
               (isinstance(n, ast.Name) and n.id == "MANIFEST_NAME") for n in ast.walk(node))


def manifest_reads(source: str) -> list[int]:
    """Lines of ``source`` that read a manifest themselves: ``manifest[...]``, ``manifest.get(...)``,
    ``... in manifest`` (of a name or an attribute called manifest), or ``json.load(s)`` of a
    manifest.json."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Subscript) and _is_manifest(node.value) and isinstance(node.ctx, ast.Load):
            lines.append(node.lineno)
        elif isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops) and any(
                _is_manifest(c) for c in node.comparators):
            lines.append(node.lineno)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            func = node.func
            if func.attr == "get" and _is_manifest(func.value):
                lines.append(node.lineno)
            elif (func.attr in ("load", "loads") and isinstance(func.value, ast.Name) and func.value.id == "json"
                  and any(_names_manifest_file(arg) for arg in node.args)):
                lines.append(node.lineno)
    return sorted(lines)


def test_the_scan_sees_each_kind_of_read():
    """The check is live: each way of reading a manifest by hand is found, writing one is not."""
    source = '''
a = bundle.manifest["family"]
b = self.bundle.manifest.get("max_positions")
c = manifest["files"][manifest["graphs"]["step"]["file"]]
d = json.loads((path / "manifest.json").read_text())
e = json.load(open(path / MANIFEST_NAME))
manifest["architecture"] = "armt"
f = bundle.family
g = "memory_init" in bundle.manifest
'''
    assert manifest_reads(source) == [2, 3, 4, 4, 5, 6, 9]


def test_product_code_reads_manifests_only_through_the_schema():
    found = {}
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            name = path.relative_to(ROOT).as_posix()
            if name in READERS or name in PENDING:
                continue
            lines = manifest_reads(path.read_text())
            if lines:
                found[name] = lines
    assert found == {}, ("these read a manifest by hand; use Bundle's accessors (add one in runtime/bundle.py "
                         f"reading self.doc): {found}")


# ---- the accessors that replaced the reads give what the export wrote ----------------------------
JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(1 << 40), max_value=1 << 40),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
JSON = st.recursive(JSON_LEAF, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                    max_leaves=8)
EXTRA_KEYS = st.text(min_size=1, max_size=12).filter(lambda k: k not in ("backbone", "armt", "id2label",
                                                                         "eos_token_id", "passed", "bf16"))


@pytest.fixture(scope="module")
def written(bundle_factory):
    """(bundle path, manifest as written) of the tiny GPT-2 bundle."""
    result = bundle_factory("gpt2", "fp32")[1]
    return result.path, result.manifest


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(extra=st.dictionaries(EXTRA_KEYS, JSON, max_size=4),
       backbone_extra=st.dictionaries(EXTRA_KEYS, JSON, max_size=4),
       id2label=st.none() | st.dictionaries(st.integers(0, 99).map(str), st.text(max_size=8), max_size=4),
       eos=st.sampled_from(["absent", None, 3, [1, 2]]),
       report_extra=st.dictionaries(EXTRA_KEYS, JSON, max_size=4),
       passed=st.sampled_from(["absent", True, False, None]))
def test_rmt_config_and_validation_are_what_was_written(written, extra, backbone_extra, id2label, eos,
                                                         report_extra, passed):
    """The reference backend compares a checkpoint's config with ``Bundle.rmt_config``, and the
    demo and export benchmark print ``Bundle.validation``: both must be the document as written,
    with neither defaults added nor unknown keys dropped."""
    path, manifest = written
    manifest = copy.deepcopy(manifest)
    backbone = dict(manifest["rmt_config"].get("backbone") or {}, **backbone_extra)
    backbone.pop("id2label", None)
    backbone.pop("eos_token_id", None)
    if id2label is not None:
        backbone["id2label"] = id2label
    if eos != "absent":
        backbone["eos_token_id"] = eos
    manifest["rmt_config"] = dict(manifest["rmt_config"], **extra, backbone=backbone)
    report = dict(manifest["validation"], **report_extra)
    if passed != "absent":
        report["passed"] = passed
    manifest["validation"] = report
    bundle = Bundle(path=path, manifest=manifest)
    assert bundle.rmt_config == manifest["rmt_config"]
    assert bundle.validation == manifest["validation"]
    assert bundle.id2label == {int(k): v for k, v in (id2label or {}).items()}


def test_a_manifest_without_config_or_report_has_none(written):
    path, manifest = written
    bare = {k: v for k, v in manifest.items() if k != "rmt_config"}
    bundle = Bundle(path=path, manifest=dict(bare, validation=None))
    assert bundle.rmt_config is None and bundle.validation == {} and not bundle.validated_bf16
