"""What a person sees in the MLflow UI after a pipeline run, read from pages a real browser rendered.

The tiny kfp.local run the pipeline tests share (conftest's `failed_then_resumed`) records into SQLite as
`make demo` does; a real
`mlflow server` on 127.0.0.1 serves that store, as `mlflow ui --backend-store-uri sqlite:///...` does after the
demo; headless Chromium loads the UI (a React app: the content exists only once its scripts ran) and hands back
the rendered DOM, which the browser tests read as text and links (they skip without Chromium). The last test
reads the training log and the model's metrics through the REST API.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import MlflowServer

pytest.importorskip("kfp")
mlflow = pytest.importorskip("mlflow")

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
STUDENT = "a"
CHAIN = ["a", "a-pruned", "teacher-corrected", "teacher"]  # the student back to the model it started from
TEACHER = "teacher-corrected"  # the model that taught the student


class Page(HTMLParser):
    """A rendered page: its visible text (whitespace collapsed) and its links as (href, text)."""

    def __init__(self, dom: str) -> None:
        super().__init__()
        self._words: list[str] = []
        self._skip = 0
        self._link: list | None = None
        self.links: list[tuple[str, str]] = []
        self.feed(dom)
        self.text = " ".join(self._words)

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self._skip += 1
        elif tag == "a":
            self._link = [dict(attrs).get("href") or "", []]

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self._skip -= 1
        elif tag == "a" and self._link is not None:
            self.links.append((self._link[0], " ".join(self._link[1])))
            self._link = None

    def handle_data(self, data):
        if self._skip:
            return
        words = data.split()
        self._words += words
        if self._link is not None:
            self._link[1] += words

    def model_links(self) -> dict[str, str]:
        """{link text: model id} of the links to logged-model pages."""
        found = {}
        for href, text in self.links:
            m = re.fullmatch(r"#/experiments/\d+/models/(m-[0-9a-f]+)", href)
            if m and text:
                found[text] = m.group(1)
        return found


def render(url: str, profile: Path, expect: str = "", tries: int = 3) -> Page:
    """The page at `url` after its scripts ran, in headless Chromium.

    `--virtual-time-budget` lets the page run 15 s of (virtual) time, fetches included, before the DOM is dumped.
    On a busy machine the app may still show its loading placeholders then: the page is rendered again (up to
    `tries` times) until its text holds `expect`. The last rendering is returned either way.
    """
    for _ in range(tries):
        done = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
             "--virtual-time-budget=15000", "--dump-dom", url],
            check=False, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        page = Page(done.stdout)
        if expect in page.text:
            break
    return page


@pytest.fixture(scope="module")
def pipeline_run(failed_then_resumed):
    """The state of the tiny pipeline run the pipeline tests share (conftest): students a and b, a corrected
    teacher, distillation in two processes, tracked in its run directory's SQLite store."""
    from secateurs.local_run import read_run

    _, state = read_run(failed_then_resumed[0])
    return state


@pytest.fixture(scope="module")
def server(pipeline_run, tmp_path_factory):
    """`mlflow server` over the run's SQLite store: the UI and the REST API at one URI."""
    server = MlflowServer(
        tmp_path_factory.mktemp("ui-server"), backend_store_uri=pipeline_run["tracking_uri"]
    )
    try:
        yield server.wait()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def recorded(server):
    """The experiment id, the logged models by name, and the distill run of the student, read over REST."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=server, registry_uri=server)
    experiment = client.get_experiment_by_name("secateurs")
    models = {m.name: m for m in client.search_logged_models([experiment.experiment_id])}
    return experiment.experiment_id, models, client


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    """Chromium's profile directory for this module; the browser tests skip without Chromium."""
    if CHROMIUM is None:
        pytest.skip(
            "headless Chromium is not installed: `apt-get install chromium` (Debian; .ci/run installs it)"
        )
    return tmp_path_factory.mktemp("chromium-profile")


def test_run_page_links_to_the_model_it_made(profile, server, recorded):
    experiment_id, models, _ = recorded
    student = models[STUDENT]
    page = render(
        f"{server}/#/experiments/{experiment_id}/runs/{student.source_run_id}",
        profile,
        expect="Logged models",
    )
    links = page.model_links()
    assert links.get(STUDENT) == student.model_id, page.links
    # The models it read (the pruned student and the teacher) are linked from the same table.
    assert links.get("a-pruned") == models["a-pruned"].model_id
    assert links.get(TEACHER) == models[TEACHER].model_id


def test_student_model_page_tells_where_it_came_from(profile, server, recorded):
    experiment_id, models, _ = recorded
    page = render(
        f"{server}/#/experiments/{experiment_id}/models/{models[STUDENT].model_id}",
        profile,
        expect="Model versions",
    )
    # Its parent and its teacher, by name, each a link to its page.
    links = page.model_links()
    assert links.get("a-pruned") == models["a-pruned"].model_id, page.text
    assert links.get(TEACHER) == models[TEACHER].model_id, page.text
    # The registered version, as MLflow's own "Model versions" field shows it.
    assert re.search(r"Model versions secateurs-a v1\b", page.text), page.text
    # The data it learned from, as MLflow's own "Datasets used" field shows it.
    assert re.search(r"Datasets used docs \(#[0-9a-f]+\)", page.text), page.text
    # The training log is the run's, not flattened onto the model.
    assert "log_history" not in page.text


def test_parent_links_lead_from_the_student_back_to_the_teacher(profile, server, recorded):
    """From the student's page, follow the link to the model it was made from, page after page."""
    experiment_id, models, _ = recorded
    model_id, seen = models[STUDENT].model_id, []
    for name, parent in zip(CHAIN, [*CHAIN[1:], None]):
        page = render(
            f"{server}/#/experiments/{experiment_id}/models/{model_id}",
            profile,
            expect="About this logged model",
        )
        seen.append(name)
        assert re.search(rf"Models {re.escape(name)}\b", page.text), page.text[:500]  # the breadcrumb's title
        if parent is None:
            assert (
                "made from" not in page.text.lower()
            )  # the teacher came from the hub, not from a model here
            break
        model_id = page.model_links()[parent]
    assert seen == CHAIN


def test_training_log_is_a_metric_history_of_the_run(recorded):
    _, models, client = recorded
    student = models[STUDENT]
    curve = client.get_metric_history(student.source_run_id, "train/loss")
    assert [m.step for m in curve] == [1, 2]  # max_steps=2, logging_steps=1
    assert all(m.value > 0 for m in curve)
    # The model keeps the numbers that summarise its training (and, from the evaluate run, its scores).
    from_training = {m.key for m in student.metrics if m.run_id == student.source_run_id}
    assert from_training == {
        "steps",
        "final_loss",
        "mean_loss",
        "tokens_seen",
        "processes",
        "train_share.docs",
    }
    data = [(m.dataset_name, m.value) for m in student.metrics if m.key == "train_share.docs"]
    assert data == [("docs", 1.0)]  # the one source of the blend, whose dataset the model page lists
    pruned = models["a-pruned"]
    from_pruning = {m.key for m in pruned.metrics if m.run_id == pruned.source_run_id}
    assert from_pruning == {"parameters_before", "parameters_after", "parameter_ratio"}  # shapes are params
