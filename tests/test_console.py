"""The web console in a real browser: headless Chromium (Debian's chromium and chromium-driver, which
admin/test.sh installs where apt-get can), driven by Selenium, against a real server on loopback that
serves the packaged Gemma 3 270M and MiniLM over a small SST-2 database.

Each view is saved as a PNG; with RAEE_CONSOLE_SCREENSHOTS=docs/console the run writes the
screenshots the docs show. Waits are generous upper bounds on conditions, never fixed sleeps.
"""

from __future__ import annotations

import functools
import itertools
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from raee_server.core.datafile import read_rows
from raee_server.core.engine import Engine
from raee_server.protos.raee.v1 import raee_pb2 as pb
from raee_server.serving.auth import add_key
from raee_server.settings import Settings
from raee_server.types import Row, TaskSpec

from .conftest import CORPORA
from .grpc_harness import ServerThread
from .test_grpc import make_settings, tiny_engine_factory

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                       reason="Debian's chromium and chromium-driver are not installed (admin/test.sh installs them "
                              "where apt-get is available)"),
]
SST2 = Path(__file__).resolve().parents[1] / "raee_server" / "cli" / "tasks" / "sst2.toml"
RECORDS = 160
WAIT = 300.0  # seconds: an upper bound for a busy two-core machine, not an expectation


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wanted = os.environ.get("RAEE_CONSOLE_SCREENSHOTS")
    where = Path(wanted) if wanted else tmp_path_factory.mktemp("screenshots")
    where.mkdir(parents=True, exist_ok=True)
    return where


@pytest.fixture(scope="module")
def real_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """The sst2 task on the real backbone, RECORDS train rows, exit heads and `auto` tuned by the server."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("console"), model_cache=Settings().models_dir,
                        address="127.0.0.1:0", http_address="127.0.0.1:0", metrics_port=-1,
                        retune_check_seconds=1.0, fit_niceness=0)  # nice 19 starves behind any other load
    server = ServerThread(settings, functools.partial(Engine.open_for_serving, settings))
    server.wait_ready()
    spec = TaskSpec.from_toml(SST2)
    server.stub.CreateTask(pb.CreateTaskRequest(name=spec.name, template=spec.template, description=spec.description,
                                                labels=[pb.Label(name=lb.name, word=lb.word) for lb in spec.labels]))
    rows = [r for r in itertools.islice(read_rows(CORPORA / "sst2" / "train.tsv"), RECORDS) if isinstance(r, Row)]
    server.stub.Ingest(iter([pb.IngestRequest(task="sst2", examples=[pb.Example(text=r.text, label=r.label)
                                                                     for r in rows])]), timeout=WAIT)
    # The server fits exit heads and tunes `auto` among their policies in the background: wait for both.
    deadline = time.monotonic() + WAIT
    while True:
        task = server.stub.GetTask(pb.GetTaskRequest(name="sst2")).task
        if task.HasField("heads") and task.auto.heads_version == task.heads.version:
            break
        assert time.monotonic() < deadline, "no exit heads, or no auto choice among them"
        time.sleep(0.5)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000",
                     "--disable-gpu", "--lang=en-US"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(DRIVER)), options=options)
    yield driver
    driver.quit()


def until(driver: Any, condition: Any, message: str) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT, poll_frequency=0.2).until(condition, message)


def text_of(driver: Any, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.ID, element_id).text)


def visible(element_id: str) -> Any:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    return ec.visibility_of_element_located((By.ID, element_id))


def full_page(driver: Any, path: Path) -> None:
    """A screenshot of the whole page, not only the window."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, max(1000, int(height)))
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(path))
    driver.set_window_size(1280, 1000)


def open_console(driver: Any, server: ServerThread) -> None:
    """Load the console and wait for its first task listing (it fills in the forms' task fields)."""
    from selenium.webdriver.common.by import By

    driver.get(f"http://127.0.0.1:{server.server.http_port}/")
    until(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#tasks tbody tr"), "the task list did not load")


def fill_in(driver: Any, element_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def test_the_console_lists_tasks_with_records_labels_auto_and_heads(real_server: ServerThread, browser: Any,
                                                                    shots: Path) -> None:
    from selenium.webdriver.common.by import By

    task = real_server.stub.GetTask(pb.GetTaskRequest(name="sst2")).task
    open_console(browser, real_server)
    row = until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "tr.task-row[data-task='sst2']"), "no sst2 row")[0]
    cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
    assert cells[0] == "sst2" and cells[1] == str(task.records)
    counts = dict(task.label_records)
    assert cells[2] == f"negative ({counts['negative']}), positive ({counts['positive']})"
    assert task.auto.policy in cells[4] and f"k={task.auto.k}" in cells[4]
    assert f"best exit {task.heads.best_exit}" in cells[5]
    assert len(row.find_elements(By.CSS_SELECTOR, "td .mini-chart rect")) == task.depth + 1
    assert text_of(browser, "server-state") == "serving"
    # The policy box offers what the server knows (GetServerInfo), and the header names its models.
    until(browser, lambda d: "depth 18" in text_of(d, "server-info"), "no server info in the header")
    # Which replica this console shows (its recent-request figures are that replica's own).
    replica = real_server.stub.GetServerInfo(pb.GetServerInfoRequest()).replica
    assert replica and text_of(browser, "server-info").startswith(f"replica {replica} ")
    offered = {o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#policies option")}
    assert {"auto", "paper", "cascade", "heads"} <= offered
    full_page(browser, shots / "tasks.png")


def ask_sst2(browser: Any, server: ServerThread, policy: str, text: str) -> None:
    """Open the console on the sst2 task and ask its try-it box `text` under `policy`."""
    from selenium.webdriver.common.by import By

    open_console(browser, server)
    until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "tr.task-row[data-task='sst2']"), "no sst2 row")[0] \
        .click()
    until(browser, visible("task-section"), "the task panel did not open")
    fill_in(browser, "try-policy", policy)
    fill_in(browser, "try-text", text)
    browser.find_element(By.ID, "try-submit").click()
    until(browser, visible("try-result"), "no answer shown")


def test_try_it_shows_the_label_exit_layer_and_neighbours_of_a_real_text(real_server: ServerThread, browser: Any,
                                                                         shots: Path) -> None:
    from selenium.webdriver.common.by import By

    text = "a gorgeous , witty , seductive movie ."
    ask_sst2(browser, real_server, "paper-heads", text)
    expected = real_server.stub.Classify(pb.ClassifyRequest(task="sst2", text=text, options=pb.ClassifyOptions(
        policy="paper-heads", return_neighbours=True)))
    assert text_of(browser, "try-label") == expected.label
    assert (text_of(browser, "try-exit"), text_of(browser, "try-depth")) == (str(expected.exit_layer), "18")
    assert text_of(browser, "try-answered-by") == expected.policy == "paper-heads"
    neighbours = [[c.text for c in r.find_elements(By.TAG_NAME, "td")]
                  for r in browser.find_elements(By.CSS_SELECTOR, "#try-neighbours tbody tr")]
    assert len(neighbours) == 12  # the server's default k
    assert [(row[1], row[2]) for row in neighbours] == [(n.label, f"{n.similarity:.3f}") for n in expected.neighbours]
    # The task panel counts the answer among the recent requests (refreshed every few seconds).
    until(browser, lambda d: "answers" in text_of(d, "recent-summary"), "recent requests not shown")
    replica = real_server.stub.GetServerInfo(pb.GetServerInfoRequest()).replica
    assert f"answers on replica {replica} " in text_of(browser, "recent-summary")
    assert browser.find_elements(By.CSS_SELECTOR, "#recent-exits rect")
    full_page(browser, shots / "try-it.png")


def test_a_neighbour_can_be_deleted_from_the_answer(real_server: ServerThread, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    from raee_server.stores.records import record_id

    text = "a mislabelled record the console will delete ."
    real_server.stub.Ingest(iter([pb.IngestRequest(task="sst2", examples=[pb.Example(text=text, label="negative")])]))
    before = real_server.stub.GetTask(pb.GetTaskRequest(name="sst2")).task.records
    ask_sst2(browser, real_server, "knn-vote", text)
    first = browser.find_elements(By.CSS_SELECTOR, "#try-neighbours tbody tr")[0]
    assert first.find_elements(By.TAG_NAME, "code")[0].text == record_id("sst2", text)  # itself, nearest
    first.find_element(By.CSS_SELECTOR, "button.delete-record").click()
    browser.switch_to.alert.accept()
    until(browser, lambda d: first.find_element(By.CSS_SELECTOR, "button.delete-record").text == "deleted",
          "the delete did not finish")
    assert "deleted" in (first.get_attribute("class") or "")
    again = real_server.stub.Classify(pb.ClassifyRequest(task="sst2", text=text, options=pb.ClassifyOptions(
        policy="knn-vote", return_neighbours=True)))
    assert record_id("sst2", text) not in {n.id for n in again.neighbours}
    assert real_server.stub.GetTask(pb.GetTaskRequest(name="sst2")).task.records == before - 1


def test_a_bad_input_shows_the_servers_error_message(real_server: ServerThread, browser: Any, shots: Path) -> None:
    import grpc
    from selenium.webdriver.common.by import By

    open_console(browser, real_server)
    fill_in(browser, "try-task", "sst2")
    fill_in(browser, "try-text", "\u200b\u2060")  # invisible characters only
    browser.find_element(By.ID, "try-submit").click()
    until(browser, visible("try-error"), "no error shown")
    with pytest.raises(grpc.RpcError) as info:
        real_server.stub.Classify(pb.ClassifyRequest(task="sst2", text="\u200b\u2060"))
    assert text_of(browser, "try-error") == info.value.details()
    fill_in(browser, "try-text", "fine")
    fill_in(browser, "try-task", "no-such-task")
    browser.find_element(By.ID, "try-submit").click()
    until(browser, lambda d: "does not exist" in text_of(d, "try-error"), "no error for an unknown task")
    full_page(browser, shots / "error.png")


def test_the_ingest_form_adds_rows_and_reports_rejected_rows_by_line_number(real_server: ServerThread, browser: Any,
                                                                            tmp_path: Path, shots: Path) -> None:
    from selenium.webdriver.common.by import By

    before = real_server.stub.GetTask(pb.GetTaskRequest(name="sst2")).task.records
    upload = tmp_path / "new-reviews.tsv"
    upload.write_text("text\tlabel\n"
                      "an enchanting , tender film\tpositive\n"   # line 2
                      "\tnegative\n"                              # line 3: empty text
                      "a tedious , joyless slog\tnegative\n"      # line 4
                      "no label column here\n"                    # line 5: one field
                      "sharp and very funny\t \n"                 # line 6: empty label
                      "the plot collapses early\tnegative\n",     # line 7
                      encoding="utf-8")
    open_console(browser, real_server)
    fill_in(browser, "ingest-task", "sst2")
    browser.find_element(By.ID, "ingest-file").send_keys(str(upload))
    browser.find_element(By.ID, "ingest-submit").click()
    until(browser, visible("ingest-summary"), "no ingest summary")
    assert text_of(browser, "ingest-summary") == "new-reviews.tsv: 3 added, 0 already present, 3 rejected"
    rows = [[c.text for c in r.find_elements(By.TAG_NAME, "td")]
            for r in browser.find_elements(By.CSS_SELECTOR, "#ingest-rejections tbody tr")]
    assert rows == [["3", "empty text"], ["5", "1 tab-separated fields; the header has 2"], ["6", "empty label"]]
    assert browser.find_element(By.ID, "ingest-progress").get_attribute("value") == "5"
    assert real_server.stub.GetTask(pb.GetTaskRequest(name="sst2")).task.records == before + 3
    full_page(browser, shots / "ingest.png")


def test_with_api_keys_on_the_console_asks_for_one_and_then_works(tmp_path: Path, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    key_file = tmp_path / "keys.toml"
    admin = add_key(key_file, "ops", [], scope="admin")
    settings = make_settings(tmp_path, api_keys_file=key_file)
    server = ServerThread(settings, tiny_engine_factory(tmp_path, settings))
    try:
        server.wait_ready()
        open_console(browser, server)
        until(browser, lambda d: "needs an API key" in text_of(d, "notice"), "the console did not ask for a key")
        browser.find_element(By.ID, "api-key").send_keys(admin)
        browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
        until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "tr.task-row[data-task='sentiment']"),
              "tasks not listed with the key")
        assert not browser.find_element(By.ID, "notice").is_displayed()
    finally:
        browser.execute_script("sessionStorage.clear()")
        server.stop()


def test_operations_are_listed_with_progress_and_started_from_the_task_panel(real_server: ServerThread,
                                                                             browser: Any, shots: Path) -> None:
    """The server's own background fit is an operation the console lists; "Fit exit heads" starts one
    and the table follows it to its end."""
    from selenium.webdriver.common.by import By

    open_console(browser, real_server)

    def rows(d: Any) -> list[list[str]]:  # read in one script: the table is redrawn every second
        return list(d.execute_script(
            "return [...document.querySelectorAll('#operations tr.operation')]"
            ".map(r => [...r.querySelectorAll('td')].map(c => c.innerText.trim()))"))

    until(browser, lambda d: any(r[1] == "fit-heads" and r[2] == "sst2" and r[3] == "succeeded" for r in rows(d)),
          "the background fit is not listed")
    before = {r[0] for r in rows(browser)}
    until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "tr.task-row[data-task='sst2']"), "no sst2 row")[0] \
        .click()
    until(browser, visible("task-section"), "the task panel did not open")
    browser.find_element(By.ID, "fit-heads").click()
    started = until(browser, lambda d: [r for r in rows(d) if r[0] not in before and r[1] == "fit-heads"],
                    "the started fit is not listed")[0]
    assert started[2] == "sst2" and browser.execute_script(
        f"return document.querySelector(\"#operations tr[data-operation='{started[0]}'] progress\") !== null")
    until(browser, lambda d: any(r[0] == started[0] and r[3] == "succeeded" for r in rows(d)),
          "the started fit did not finish")
    served = real_server.stub.GetTask(pb.GetTaskRequest(name="sst2")).task
    assert served.heads.version >= 2  # the console's fit stored a new version
    full_page(browser, shots / "operations.png")


def test_a_pair_task_gets_a_box_per_input_and_its_file_a_column_per_input(real_server: ServerThread, browser: Any,
                                                                          tmp_path: Path, shots: Path) -> None:
    from selenium.webdriver.common.by import By

    pairs = TaskSpec.from_toml(SST2.parent / "trec-pairs.toml")
    real_server.stub.CreateTask(pb.CreateTaskRequest(name=pairs.name, template=pairs.template, inputs=pairs.inputs,
                                                     labels=[pb.Label(name=lb.name, word=lb.word)
                                                             for lb in pairs.labels]))
    upload = tmp_path / "pairs.tsv"
    upload.write_text("question1\tquestion2\tlabel\n"
                      "Who wrote Hamlet ?\tWho painted the Mona Lisa ?\tsame\n"            # line 2
                      "How far is the moon ?\tWhat is the capital of Peru ?\tdifferent\n"  # line 3
                      "When did the war end ?\t\tdifferent\n",                            # line 4: empty input
                      encoding="utf-8")
    open_console(browser, real_server)
    fill_in(browser, "ingest-task", pairs.name)
    browser.find_element(By.ID, "ingest-file").send_keys(str(upload))
    browser.find_element(By.ID, "ingest-submit").click()
    until(browser, visible("ingest-summary"), "no ingest summary")
    assert text_of(browser, "ingest-summary") == "pairs.tsv: 2 added, 0 already present, 1 rejected"
    rows = [[c.text for c in r.find_elements(By.TAG_NAME, "td")]
            for r in browser.find_elements(By.CSS_SELECTOR, "#ingest-rejections tbody tr")]
    assert rows == [["4", "question2: empty text"]]

    fill_in(browser, "try-task", pairs.name)
    until(browser, visible("try-inputs"), "no box per input")
    assert not browser.find_element(By.ID, "try-text").is_displayed()
    asked = {"question1": "Who invented the telephone ?", "question2": "Who discovered penicillin ?"}
    for name, value in asked.items():
        box = browser.find_element(By.CSS_SELECTOR, f"#try-inputs textarea[data-input={name}]")
        box.clear()
        box.send_keys(value)
    fill_in(browser, "try-policy", "knn-vote")
    browser.find_element(By.ID, "try-submit").click()
    until(browser, visible("try-result"), "no answer")
    expected = real_server.stub.Classify(pb.ClassifyRequest(task=pairs.name, inputs=asked,
                                                            options=pb.ClassifyOptions(policy="knn-vote")))
    assert text_of(browser, "try-label") == expected.label
    full_page(browser, shots / "try-it-pair.png")
    fill_in(browser, "try-task", "sst2")  # a single-text task: the one box again
    until(browser, visible("try-text"), "the text box did not come back")
    fill_in(browser, "try-policy", "")
