"""The demo page (python -m cbp_jax.serve): the legend's pure parts against NumPy counts, and
the page itself served from a workdir and driven in headless Chromium (Debian's chromium and
chromium-driver, installed by the ``chromium`` fixture when missing): an image's legend and
overlay, a video's, and the messages for files that are not images."""

import os
import re
import shutil
import subprocess
import sys
import time
import types
import urllib.request

import numpy as np
import pytest
from config_helpers import load_config, perturbed_workdir
from multiprocess import free_port
from PIL import Image

from cbp_jax import predict, serve

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BROWSER_INSTALL = ["apt-get", "install", "-y", "-o", "DPkg::Lock::Timeout=300"]
BROWSER_PACKAGES = ["chromium", "chromium-driver"]
INSTALL_HINT = "apt-get update && apt-get install -y chromium chromium-driver (as root)"
WAIT_S = 300  # server start-up, and the first image (it compiles the model)


# ----------------------------------------------------------------------------- legend


def _numpy_legend(classes: np.ndarray, num_classes: int):
    """[(class id, share)] of the ids in [0, num_classes), most pixels first, then by id."""
    ids, counts = np.unique(classes[(classes >= 0) & (classes < num_classes)], return_counts=True)
    order = sorted(range(len(ids)), key=lambda k: (-counts[k], ids[k]))
    return [(int(ids[k]), counts[k] / counts.sum()) for k in order]


def test_legend_rows_match_numpy_counts():
    rng = np.random.default_rng(0)
    num_classes = 12
    classes = rng.choice([0, 2, 3, 7, 11, 255], size=(2, 37, 53), p=[0.4, 0.1, 0.1, 0.2, 0.1, 0.1])
    classes[0, :4, :5] = 5  # 20 pixels, a class that appears in one frame only
    names = [f"class {i}" for i in range(num_classes)]
    palette = rng.integers(0, 256, (num_classes, 3), dtype=np.uint8)

    counts = serve.class_counts(classes, num_classes)
    rows = serve.legend_rows(counts, names, palette)

    expected = _numpy_legend(classes, num_classes)
    assert [row.class_id for row in rows] == [i for i, _ in expected]
    np.testing.assert_allclose([row.share for row in rows], [s for _, s in expected], rtol=1e-12)
    assert [row.name for row in rows] == [names[i] for i, _ in expected]
    assert [row.colour for row in rows] == [tuple(palette[i].tolist()) for i, _ in expected]
    assert counts.sum() == np.sum(classes != 255)  # the ignored pixels are not counted


def test_legend_rows_break_ties_by_class_id_and_name_a_size_mismatch():
    rows = serve.legend_rows(np.array([0, 3, 3, 6]), list("abcd"), np.zeros((4, 3), np.uint8))
    assert [(row.class_id, row.share) for row in rows] == [(3, 0.5), (1, 0.25), (2, 0.25)]
    with pytest.raises(ValueError, match="4 counts, 3 class names and 4 palette colours"):
        serve.legend_rows(np.ones(4), list("abc"), np.zeros((4, 3), np.uint8))


def test_legend_html_escapes_names_and_shows_shares_and_colours():
    rows = [serve.LegendRow(4, "<sky & sea>", (255, 0, 16), 0.12345)]
    page = serve.legend_html(rows, "Classes in x.png")
    assert "&lt;sky &amp; sea&gt;" in page and "<sky" not in page
    assert '<td class="legend-share" style="text-align:right">12.35 %</td>' in page
    assert "background:#ff0010" in page and 'data-class-id="4"' in page


def test_uploads_that_are_not_images_give_messages(tmp_path):
    """No model is needed to turn these away: the message names the file and the fix."""
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    said = {
        name: serve.segment_upload(None, str(tmp_path / name), out_dir=str(tmp_path))
        for name in ("notes.txt", "broken.jpg")
    }
    assert said["notes.txt"].message.startswith(
        "**Cannot segment this file**: notes.txt is not an image or a video (its suffix .txt"
    )
    assert ".png" in said["notes.txt"].message and ".mp4" in said["notes.txt"].message
    assert "cannot read the image broken.jpg" in said["broken.jpg"].message
    assert str(tmp_path) not in said["broken.jpg"].message  # not the upload's temporary path
    for result in said.values():
        assert result.overlay is None and result.video is None and result.legend == ""


@pytest.mark.parametrize(
    "done, count, expected",
    [
        (3, 5, "the first 3 of 5 frames (the page segments 3 at most)"),
        (3, 0, "the first 3 frames (the page segments 3 at most)"),  # count unknown
        (3, 3, "all 3 frames"),
        (2, 5, "all 2 readable frames (the file says 5)"),  # it ended early
        (2, 0, "all 2 frames"),
    ],
)
def test_frames_text_says_when_the_cap_cut_the_video(done, count, expected):
    assert serve.frames_text(done, count, max_frames=3) == expected


@pytest.mark.parametrize(
    "flag_values, message",
    [
        ({"weights": "w.safetensors", "step": 3}, "pass --step (a checkpoint of --workdir) or"),
        ({"overlay_alpha": 1.5}, "--overlay_alpha 1.5; use a number in [0, 1]"),
        ({"max_frames": 0}, "--max_frames 0; use an integer >= 1"),
        ({"port": 70000}, "--port 70000; use a port in 0..65535"),
    ],
)
def test_bad_flags_stop_naming_the_flag_and_the_fix(flag_values, message):
    defaults = {"weights": None, "step": None, "overlay_alpha": 0.5, "max_frames": 10, "port": 0}
    with pytest.raises(SystemExit, match=re.escape(message)):
        serve.check_flags(types.SimpleNamespace(**(defaults | flag_values)))
    serve.check_flags(types.SimpleNamespace(**defaults))  # the defaults pass


# ----------------------------------------------------------------------------- the browser


def _browser() -> tuple[str | None, str | None]:
    return shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="session")
def chromium() -> tuple[str, str]:
    """(chromium, chromedriver) paths; installs Debian's chromium and chromium-driver once
    (apt-get, as root) when they are missing, and fails naming the command when it cannot."""
    if all(_browser()):
        return _browser()
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.fail(f"the demo page test needs chromium and chromedriver: {INSTALL_HINT}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], BROWSER_INSTALL + BROWSER_PACKAGES):
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{' '.join(command)} ran past 1200 s. Install the browser: {INSTALL_HINT}")
        if done.returncode != 0:
            pytest.fail(
                f"{' '.join(command)} failed (exit {done.returncode}):\n"
                f"{(done.stdout + done.stderr)[-2000:]}\nInstall the browser: {INSTALL_HINT}"
            )
    if not all(_browser()):
        pytest.fail(f"chromium / chromedriver still not on PATH after {INSTALL_HINT}")
    return _browser()


def _start_server(config_spec: str, workdir: str, tmp_path, *args: str):
    """``python -m cbp_jax.serve`` on a free port: (process, url, log path) once it answers."""
    import jax

    port = free_port()
    log = tmp_path / "server.log"
    (tmp_path / "server_tmp").mkdir()
    env = os.environ | {
        "TMPDIR": str(tmp_path / "server_tmp"),
        "GRADIO_TEMP_DIR": str(tmp_path / "gradio"),
        "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
    }
    command = [sys.executable, "-m", "cbp_jax.serve", "--config", config_spec]
    command += ["--workdir", workdir, "--host", "127.0.0.1", "--port", str(port), *args]
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy for it
    deadline = time.monotonic() + WAIT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with opener.open(url, timeout=5) as answer:
                if answer.status == 200:
                    return proc, url, log
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no answer from {url} in {WAIT_S} s:\n{log.read_text()[-3000:]}")
        time.sleep(1)


def _driver(chromium):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1280,1400")
    return webdriver.Chrome(options=options, service=Service(executable_path=chromium[1]))


def _upload(driver, url: str, path: str, proc, done_selector: str):
    """Loads the page, drops ``path`` on the file input, waits for ``done_selector``."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    wait = WebDriverWait(driver, WAIT_S)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"))
    driver.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(path)

    def finished(d):
        assert proc.poll() is None, "the server died"
        return d.find_elements(By.CSS_SELECTOR, done_selector)

    wait.until(finished)


def _legend(driver) -> list[tuple[str, float]]:
    """[(class name, share %)] as the page shows them, top to bottom."""
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, "#legend tr.legend-row")
    cells = [
        (
            r.find_element(By.CSS_SELECTOR, ".legend-name").text,
            r.find_element(By.CSS_SELECTOR, ".legend-share").text,
        )
        for r in rows
    ]
    return [(name, float(share.removesuffix("%").strip())) for name, share in cells]


def _assert_legend(shown, classes, seg, where: str):
    """The page's legend is NumPy's count of the Segmenter's classes (shares to 0.01 %)."""
    expected = _numpy_legend(classes, seg.num_classes)
    assert len(expected) >= 2, "a constant prediction would not test the order"
    names = [seg.class_names[i] for i, _ in expected]
    assert [name for name, _ in shown] == names, where
    np.testing.assert_allclose(
        [s for _, s in shown], [100 * s for _, s in expected], atol=0.0051, err_msg=where
    )


def _test_image(path) -> np.ndarray:
    """A smooth random 64 x 128 RGB image (regions, not noise), saved as a PNG at ``path``."""
    small = np.random.default_rng(4).integers(0, 256, (4, 8, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(small).resize((128, 64), Image.BILINEAR))
    Image.fromarray(image).save(path)
    return image


@pytest.mark.slow
def test_demo_page_in_headless_chromium(tmp_path, chromium):
    """Upload a PNG: the legend lists the Segmenter's classes with their pixel shares, most
    first, and the overlay shows; a 5-frame video with --max_frames 3: the overlay video
    plays and the legend counts its first 3 frames; a text file and a broken PNG: a message
    on the page, no traceback. Screenshots are saved in tmp_path."""
    from selenium.webdriver.common.by import By

    config = load_config("scenes_mit_b0", "smoke")  # test_scale (128, 64): 64 x 128 stays
    workdir = perturbed_workdir(config, str(tmp_path / "run"))
    image = _test_image(tmp_path / "street.png")
    video = str(tmp_path / "clip.mp4")
    writer = predict.VideoWriter(video, 5.0, (64, 128))
    for k in range(5):
        writer.write(np.roll(image, 16 * k, axis=1))
    writer.close()
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(b"not a png either")
    seg = predict.Segmenter.from_workdir(config, workdir)

    spec = os.path.join(REPO, "configs", "scenes_mit_b0.py:smoke")
    proc, url, log = _start_server(spec, workdir, tmp_path, "--max_frames", "3")
    driver = None
    try:
        driver = _driver(chromium)
        shot = tmp_path / "demo_image.png"
        _upload(driver, url, str(tmp_path / "street.png"), proc, "#legend tr.legend-row")
        driver.save_screenshot(str(shot))
        where = f"image upload (screenshot: {shot})"
        _assert_legend(_legend(driver), seg(image), seg, where)
        overlay = driver.find_element(By.CSS_SELECTOR, "#overlay img")
        assert overlay.is_displayed(), where
        size = driver.execute_script(
            "return [arguments[0].naturalWidth, arguments[0].naturalHeight]", overlay
        )
        assert size == [128, 64], where
        status = driver.find_element(By.CSS_SELECTOR, "#status").text
        assert "street.png: 128 x 64 pixels, model time" in status and " ms" in status, where

        shot = tmp_path / "demo_video.png"
        _upload(driver, url, video, proc, "#legend tr.legend-row")
        player = driver.find_element(By.CSS_SELECTOR, "#overlay-video video")
        driver.execute_script(
            "return new Promise(r => { const v = arguments[0]; if (v.readyState >= 1) r(); "
            "else v.addEventListener('loadedmetadata', () => r()); })",
            player,
        )
        driver.save_screenshot(str(shot))
        where = f"video upload (screenshot: {shot})"
        frames = np.stack(list(predict.read_video(video)[0])[:3])
        _assert_legend(_legend(driver), seg(frames), seg, where)
        assert driver.execute_script("return arguments[0].videoWidth", player) == 128, where
        status = driver.find_element(By.CSS_SELECTOR, "#status").text
        assert "the first 3 of 5 frames" in status and "per frame" in status, where

        for name, message in [
            ("notes.txt", "Cannot segment this file: notes.txt is not an image or a video"),
            ("broken.png", "Cannot segment this file: cannot read the image broken.png"),
        ]:
            shot = tmp_path / f"demo_{name.replace('.', '_')}.png"
            _upload(driver, url, str(tmp_path / name), proc, "#status p")
            driver.save_screenshot(str(shot))
            where = f"{name} upload (screenshot: {shot})"
            assert message in driver.find_element(By.CSS_SELECTOR, "#status").text, where
            assert not driver.find_elements(By.CSS_SELECTOR, "#legend tr.legend-row"), where
            assert "Traceback" not in driver.page_source, where
    finally:
        if driver is not None:
            driver.quit()
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    server_log = log.read_text()
    assert proc.returncode == 0 and "Traceback" not in server_log, server_log[-3000:]
    assert not list((tmp_path / "server_tmp").glob("cbp_serve_*")), "the videos' folder stays"
