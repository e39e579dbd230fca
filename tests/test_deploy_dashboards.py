"""Grafana dashboards and Prometheus configs in deploy/ agree with genserve.metrics.

Every PromQL expression in a dashboard must name only series the server exports
and only labels those series carry; every family should appear on some
dashboard. With Debian's ``prometheus`` package installed, ``promtool`` also
checks the configs and parses every expression.
"""
from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess

import pytest
import yaml

from genserve.metrics import FAMILIES, FAMILY_NAMES, series_names

DEPLOY = pathlib.Path(__file__).resolve().parents[1] / "deploy"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
EXPECTED = {"genserve-overview", "genserve-scheduling", "genserve-devices"}
# Labels Prometheus attaches at scrape time (target labels in deploy/prometheus).
TARGET_LABELS = {"instance", "job", "service"}
# Grafana's variables, replaced by plausible values for promtool.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__range": "1h", "$__interval": "15s", "$instance": ".*"}

PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "offset", "and", "or", "unless", "inf", "nan", "atan2",
}
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_IDENT = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(\s*\()?")
_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)\s*\{([^}]*)\}")
_MATCHER_LABEL = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")


def metric_names(expr: str) -> set[str]:
    """Series names an expression selects: strip strings, grouping clauses, label
    matchers and range selectors, then keep identifiers that are not function
    calls, keywords or numbers."""
    text = _STRING.sub('""', expr)
    text = _GROUPING.sub(" ", text)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    names = set()
    for m in _IDENT.finditer(text):
        ident, call = m.group(1), m.group(2)
        if call or ident.lower() in PROMQL_KEYWORDS:
            continue
        names.add(ident)
    return names


def grouping_labels(expr: str) -> set[str]:
    """Labels named in by/without/on/ignoring/group_* clauses."""
    text = _STRING.sub('""', expr)
    return {lab.strip() for m in _GROUPING.finditer(text)
            for lab in m.group(2).split(",") if lab.strip()}


def matcher_labels(expr: str) -> dict[str, set[str]]:
    """For each ``name{...}`` selector, the label names its matchers use."""
    out: dict[str, set[str]] = {}
    for m in _SELECTOR.finditer(expr):
        body = _STRING.sub('""', m.group(2))
        out.setdefault(m.group(1), set()).update(_MATCHER_LABEL.findall(body))
    return out


def family_of(series: str):
    for fam in FAMILIES:
        if series == fam.name or (fam.kind == "histogram" and series in
                                  {fam.name + s for s in ("_bucket", "_sum", "_count")}):
            return fam
    return None


def load(path: pathlib.Path) -> dict:
    return json.loads(path.read_text())


def panels(board: dict):
    for p in board["panels"]:
        yield p
        yield from p.get("panels", [])  # collapsed rows nest their panels


def targets(board: dict):
    for p in panels(board):
        for t in p.get("targets", []):
            yield p, t


def all_exprs():
    return [(path.name, p["title"], t) for path in DASHBOARDS
            for p, t in targets(load(path))]


# -- the tokenizer itself -----------------------------------------------------
@pytest.mark.parametrize("expr, names", [
    ('sum by (task, le) (rate(foo_bucket{a="x(y)", b=~"$v"}[5m]))', {"foo_bucket"}),
    ("histogram_quantile(0.99, sum(rate(a_bucket[1m])) by (le))", {"a_bucket"}),
    ("sum(rate(a_total[$__rate_interval])) / sum(rate(b_total[$__rate_interval]))",
     {"a_total", "b_total"}),
    ("a_total offset 5m > bool 3 and on(instance) up", {"a_total", "up"}),
    ('label_replace(x, "dst", "$1", "src", "(.*)") * 1e3', {"x"}),
    ("max without (device) (c) unless ignoring(job) d", {"c", "d"}),
])
def test_tokenizer(expr, names):
    assert metric_names(expr) == names


def test_tokenizer_labels():
    expr = 'sum by (task, le) (rate(foo_bucket{instance=~"$i",outcome="met"}[5m]))'
    assert grouping_labels(expr) == {"task", "le"}
    assert matcher_labels(expr) == {"foo_bucket": {"instance", "outcome"}}


# -- dashboards -----------------------------------------------------------------
def test_expected_dashboards_present():
    assert {p.stem for p in DASHBOARDS} == EXPECTED


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_shape(path):
    board = load(path)
    assert board["uid"] == path.stem and board["title"]
    assert isinstance(board["schemaVersion"], int)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells = set()
    for p in panels(board):
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panels overlap at {p['title']}"
                cells.add((x, y))
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert p["targets"] and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}" and t["expr"].strip()


def test_uids_unique():
    uids = [load(p)["uid"] for p in DASHBOARDS]
    assert len(uids) == len(set(uids))


@pytest.mark.parametrize("board, title, target", all_exprs(),
                         ids=lambda v: v if isinstance(v, str) else None)
def test_expr_names_exported_series(board, title, target):
    expr = target["expr"]
    names = metric_names(expr)
    assert names, f"{board}/{title}: no metric in {expr}"
    exported = series_names()
    unknown = names - exported
    assert not unknown, f"{board}/{title}: {unknown} not exported by genserve.metrics"
    labels = set(TARGET_LABELS)
    for name in names:
        fam = family_of(name)
        labels |= set(fam.labels) | ({"le"} if name.endswith("_bucket") else set())
    for name, used in matcher_labels(expr).items():
        fam = family_of(name)
        allowed = set(fam.labels) | TARGET_LABELS | ({"le"} if name.endswith("_bucket") else set())
        assert used <= allowed, f"{board}/{title}: {name} has no label {used - allowed}"
    assert grouping_labels(expr) <= labels, f"{board}/{title}: groups by a missing label"
    legend_labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
    if grouping_labels(expr):
        assert legend_labels <= grouping_labels(expr), f"{board}/{title}: legend label lost"


def test_every_family_is_on_a_dashboard():
    used = set()
    for _board, _title, t in all_exprs():
        used |= {family_of(n).name for n in metric_names(t["expr"])}
    assert used == set(FAMILY_NAMES), set(FAMILY_NAMES) - used


def test_instance_variable_query_names_a_family():
    for path in DASHBOARDS:
        for v in load(path)["templating"]["list"]:
            if v["type"] == "query":
                m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", v["definition"])
                assert m, v["definition"]
                fam = family_of(m.group(1))
                assert fam and m.group(2) in set(fam.labels) | TARGET_LABELS


# -- provisioning ----------------------------------------------------------------
def test_grafana_provisioning():
    prov = DEPLOY / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yaml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"].startswith("http://")
    dash = yaml.safe_load((prov / "dashboards" / "genserve.yaml").read_text())
    (provider,) = dash["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")


# -- promtool (Debian package "prometheus") -------------------------------------
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed "
                                    "(apt-get install prometheus)")


@needs_promtool
@pytest.mark.parametrize("name", ["prometheus.yml", "prometheus.local.yml"])
def test_promtool_check_config(name):
    out = subprocess.run([PROMTOOL, "check", "config", "--syntax-only",
                          str(DEPLOY / "prometheus" / name)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_promtool_parses_every_expr(tmp_path):
    rules = []
    for i, (_board, _title, t) in enumerate(all_exprs()):
        expr = t["expr"]
        for var, value in GRAFANA_VARS.items():
            expr = expr.replace(var, value)
        rules.append({"record": f"genserve:dashboard_expr_{i}", "expr": expr})
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    out = subprocess.run([PROMTOOL, "check", "rules", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# -- alerting rules ----------------------------------------------------------------
ALERTS = DEPLOY / "prometheus" / "genserve-alerts.yml"


def alert_rules():
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_names_exported_series(rule):
    """Each alert selects only series the server exports (or Prometheus's
    own ``up``) and labels they carry; it has a severity and a summary."""
    names = metric_names(rule["expr"])
    assert names and names - {"up"} <= series_names(), names - series_names()
    for name, used in matcher_labels(rule["expr"]).items():
        fam = family_of(name)
        allowed = TARGET_LABELS | (set(fam.labels) if fam else set()) | (
            {"le"} if name.endswith("_bucket") else set())
        assert used <= allowed, f"{rule['alert']}: {name} has no label {used - allowed}"
    assert rule["labels"]["severity"] in {"critical", "warning", "info"}
    assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_alerts_ship_to_kubernetes_unchanged():
    """The PrometheusRule carries exactly the rules file's groups."""
    doc = yaml.safe_load((DEPLOY / "k8s" / "prometheusrule.yaml").read_text())
    assert doc["spec"] == yaml.safe_load(ALERTS.read_text())


@needs_promtool
def test_promtool_alert_unit_tests():
    """promtool's rule unit tests: each alert fires on a server in trouble,
    after its ``for:``, and not on a healthy one."""
    out = subprocess.run([PROMTOOL, "test", "rules", "genserve-alerts.test.yml"],
                         cwd=ALERTS.parent, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
