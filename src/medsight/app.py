"""`medsight serve`: a local web app (Gradio 6) over one stage-3 export: ask about a scan, see every region the
answer names, download the masks.

    medsight serve --export checkpoints/default/stage3/export [--host 127.0.0.1] [--port 7860]
                   [--device cpu|cuda] [--auth user:pass] [--concurrency 1]

- Input: PNG/JPEG, a DICOM file, a zipped DICOM series or a NIfTI volume (volumes: slice slider and axis; the CT
  window presets of `medsight predict`), a question, multi-turn chat on the same image (changing the image,
  slice, axis or window starts a new conversation).
- Output: the answer with each code token shown as its region's name, the image with one colour per region
  and a legend (class, code, score), a table of regions, downloads (mask PNGs, NIfTI masks in the source
  geometry for volume input, answer.json, overlay.png).
- API: `/answer` (image file, question) -> (text, regions as in answer.json, files), for `gradio_client`.
- The model is loaded once. Requests that use it wait in one queue, `concurrency` at a time (default 1) and at
  most `max_queue` waiting. Uploads are moved into a private per-session folder (deleted when the session ends,
  after `session_ttl_s`, and at exit) and never logged; each answer is written in its own temporary folder,
  removed once the response has been handed over; Gradio's own cache lives in the server's private folder, is
  swept hourly and removed at exit. No DICOM header field or upload file name reaches an output.
- Offline: no share link, no analytics, no version check, no web fonts (system fonts only), no SSR node server.
"""

from __future__ import annotations

import atexit
import contextlib
import html
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from medsight.data import DataError
from medsight.predict import COLOURS, draw_overlay, write_answer
from medsight.scan import SUPPORTED, Scan, open_upload, remove_folder

log = logging.getLogger("medsight.app")

RESEARCH_NOTE = "**Research use only — not for clinical decisions.** Answers and masks come from a research model."
GENERAL_QUESTIONS = ["Is there a tumor in this image? Please segment it.", "Segment the liver.",
                     "Which organs are visible? Segment them.", "What abnormality is seen here? Please segment it."]
WINDOW_CHOICES = ["default", "abdomen", "lung", "bone", "brain", "liver", "mediastinum", "auto", "minmax"]
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
TABLE_HEADERS = ["#", "class", "code", "score", "box [x0, y0, x1, y1)", "area (px)"]



@contextlib.contextmanager
def _request_errors(gr: Any, folder: Path) -> Iterator[None]:
    """A failed request removes its folder and reaches the user as one Gradio error: the message of a user
    error (unreadable file, empty question), else the exception's type (logged in full); the server keeps
    serving."""
    try:
        yield
    except (DataError, ValueError) as err:
        remove_folder(folder)
        raise gr.Error(str(err), print_exception=False) from None
    except Exception as err:  # noqa: BLE001 -- the server keeps running; the user gets one line
        remove_folder(folder)
        log.exception("answer failed")
        raise gr.Error(f"internal error ({type(err).__name__}); see the server log", print_exception=False) from None

def _gradio():
    """Gradio, imported with its telemetry off (the variable is read at import)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    import gradio as gr

    return gr


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#%02x%02x%02x" % rgb


def region_name(region: dict) -> str:
    """What a region is called in the app: its class name, else its code."""
    return region.get("class_name") or region.get("code") or "region"


def readable_text(text: str, regions: list[dict]) -> str:
    """The answer with each emitted code token replaced, in order, by its region's name and number."""
    out, pos = [], 0
    for i, region in enumerate(regions):
        code = region.get("code") or ""
        at = text.find(code, pos) if code else -1
        if at < 0:
            continue
        out.append(text[pos:at] + f"**{region_name(region)}** ({i + 1})")
        pos = at + len(code)
    return "".join(out) + text[pos:]


def legend_html(regions: list[dict]) -> str:
    """One line per region: its colour, class name, code and score."""
    if not regions:
        return "<p class='ms-legend'>No region in this answer.</p>"
    rows = []
    for i, r in enumerate(regions):
        colour = _hex(COLOURS[i % len(COLOURS)])
        rows.append(f"<li><span class='ms-swatch' style='background:{colour}'></span> <b>{i + 1}. "
                    f"{html.escape(region_name(r))}</b> <code>{html.escape(str(r.get('code')))}</code> "
                    f"score {float(r.get('score', 0.0)):.2f}</li>")
    return "<ul class='ms-legend' id='ms-legend'>" + "".join(rows) + "</ul>"


def table_rows(regions: list[dict]) -> list[list[Any]]:
    """Rows of the region table (answer.json's regions)."""
    return [[i + 1, r.get("class_name") or "", r.get("code"), round(float(r["score"]), 3),
             "" if r["box"] is None else str(r["box"]), r["area"]] for i, r in enumerate(regions)]


def about_markdown(meta: dict, cfg: Any, export_dir: str | Path) -> str:
    """The 'about' panel: what the export is (stages, backbones, data) and its test metrics."""
    lines = [f"**Export**: `{export_dir}` — {meta.get('stage', '?')}, phases {', '.join(meta.get('phases', [])) or '?'}, "
             f"created {meta.get('created', '?')}, git `{str(meta.get('git_sha', '?'))[:10]}`",
             f"**Model**: vision `{meta.get('vision', cfg.vision.name)}` at {meta.get('image_size', cfg.data.image_size)} px, "
             f"LLM `{meta.get('llm', cfg.llm.name)}`, {len(meta.get('code_tokens', []))} region code tokens"
             + (", LoRA" if meta.get("lora") else ""),
             f"**Data**: {cfg.data.format} at `{cfg.data.root}` (modality groups: {', '.join(cfg.data.modality_groups)})"]
    if meta.get("lineage"):
        lines.append("**Lineage** (the exports this one was trained from):")
    lines = ["\n\n".join(lines)]
    for entry in meta.get("lineage", []):
        lines.append(f"- from {entry.get('stage')}: `{entry.get('path')}` (created {entry.get('created')}, "
                     f"git `{str(entry.get('git_sha'))[:10]}`)")
    metrics = meta.get("test_metrics") or {}
    if metrics:
        lines.append("\n| test metric | value |\n|---|---|")
        lines += [f"| {k.removeprefix('test/')} | {v:.3f} |" for k, v in sorted(metrics.items())]
    else:
        lines.append("\nThis export carries no test metrics (exports made before they were recorded).")
    return "\n".join(lines)


class MedSightApp:
    """The server side: one loaded model, the private work folder, the handlers behind the page and the API."""

    def __init__(self, model: Any, export_dir: str | Path, work_root: str | Path | None = None,
                 concurrency: int = 1, max_queue: int = 32, session_ttl_s: int = 3600) -> None:
        self.model, self.export_dir = model, str(export_dir)
        self.concurrency, self.max_queue, self.session_ttl_s = int(concurrency), int(max_queue), int(session_ttl_s)
        self.root = Path(work_root or tempfile.mkdtemp(prefix="medsight-serve-"))
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        for sub in ("sessions", "requests", "gradio"):
            (self.root / sub).mkdir(exist_ok=True, mode=0o700)
        meta = getattr(model, "meta", {}) or {}
        self.examples = list(meta.get("example_questions") or GENERAL_QUESTIONS)
        self.about = about_markdown(meta, model.cfg, export_dir) if hasattr(model, "cfg") else ""

    # ---------------------------------------------------------------------------- folders
    def request_folder(self) -> Path:
        """A fresh folder for one answer (removed by the caller once the response is out)."""
        path = self.root / "requests" / uuid.uuid4().hex
        path.mkdir(mode=0o700)
        return path

    def close(self) -> None:
        """Remove every upload, request folder and Gradio cache file of this server."""
        shutil.rmtree(self.root, ignore_errors=True)

    # ---------------------------------------------------------------------------- answering
    def respond(self, scan: Scan, question: str, slice_index: int | None, axis: int, window: str | None,
                history: list[dict] | None, folder: Path) -> tuple[dict, dict, np.ndarray]:
        """(answer.json content, the model's answer, the image) for `question` about one slice of `scan`,
        the outputs written into `folder`."""
        if not (question or "").strip():
            raise DataError("the question is empty: type a question about the image", field="question")
        rgb, geometry = scan.read(slice_index, axis, window)
        answer = self.model.answer(rgb, question.strip(), history=history or None)
        result = write_answer(answer, rgb, geometry, question.strip(), folder, image_label=f"upload ({scan.kind})")
        return result, answer, rgb

    def api_answer(self, image: str | None, question: str) -> Iterator[tuple[str, list[dict], list[str]]]:
        """The `/answer` endpoint: (text, regions, [mask PNGs..., answer.json]) for an uploaded file (volumes:
        the middle slice, default window)."""
        gr = _gradio()
        folder = self.request_folder()
        with _request_errors(gr, folder):
            if not image:
                raise DataError("no image file was given", field="image")
            if not (question or "").strip():
                raise DataError("the question is empty", field="question")
            scan = open_upload(image, folder / "scan")
            result, _, _ = self.respond(scan, question, None, 2, None, None, folder)
            files = [str(folder / f) for r in result["regions"] for f in r["mask_files"].values()]
            outputs = (result["text"], result["regions"], [*files, str(folder / "answer.json")])
        try:
            yield outputs  # Gradio copies the files into its cache before it resumes this generator
        finally:
            remove_folder(folder)

    # ---------------------------------------------------------------------------- page handlers
    def on_upload(self, file: str | None, state: dict | None):
        """A new file: move it into the session's folder, show its default view, reset the chat."""
        gr = _gradio()
        state = dict(state or {})
        remove_folder(state.get("folder"))
        state = {"folder": str(self.root / "sessions" / uuid.uuid4().hex), "history": [], "view": None}
        slider = gr.update(visible=False, value=0, maximum=1)
        axis = gr.update(visible=False)
        if not file:
            return state, slider, axis, None, "", [], legend_html([]), [], None
        try:
            scan = open_upload(file, state["folder"])
            rgb, geometry = scan.read()
        except (DataError, ValueError) as err:  # shown as a toast and next to the upload; nothing is kept
            remove_folder(state["folder"])
            gr.Warning(str(err))
            return state, slider, axis, None, f"**Cannot use this file**: {err}", [], legend_html([]), [], None
        state["scan"] = scan
        if scan.is_volume:
            n = scan.num_slices(2 if scan.kind != "dicom" else 0)
            index = geometry.slice_index if geometry.slice_index is not None else n // 2
            slider = gr.update(visible=True, minimum=0, maximum=max(n - 1, 1), value=index, step=1,
                               interactive=n > 1)
            axis = gr.update(visible=scan.kind in ("nifti", "dicom_series"), value=2)
        info = f"{SUPPORTED_NAME[scan.kind]}, {rgb.shape[1]} x {rgb.shape[0]} px" + (
            f", volume {' x '.join(map(str, scan.shape[:3]))}" if scan.is_volume else "")
        return state, slider, axis, rgb, info, [], legend_html([]), [], None

    def on_axis(self, axis: int, state: dict | None):
        """Another slicing axis: the slider's range follows."""
        gr = _gradio()
        scan = (state or {}).get("scan")
        if scan is None or not scan.is_volume:
            return gr.update()
        n = scan.num_slices(int(axis))
        return gr.update(maximum=max(n - 1, 1), value=n // 2, interactive=n > 1)

    def on_view(self, slice_index: float, axis: int, window: str, state: dict | None):
        """The slice/axis/window shown before asking."""
        gr = _gradio()
        scan = (state or {}).get("scan")
        if scan is None:
            return None
        try:
            return scan.read(*self._view(scan, slice_index, axis, window))[0]
        except (DataError, ValueError) as err:
            raise gr.Error(str(err), print_exception=False) from None

    @staticmethod
    def _view(scan: Scan, slice_index: float | None, axis: int | None, window: str | None):
        idx = int(slice_index) if scan.is_volume and slice_index is not None else None
        if idx is not None:
            idx = min(max(idx, 0), scan.num_slices(int(axis or 2) if scan.kind != "dicom" else 0) - 1)
        win = None if window in (None, "", "default") else str(window).strip()
        return idx, int(axis if axis is not None else 2), win

    def on_ask(self, question: str, slice_index: float, axis: int, window: str, state: dict | None,
               chat: list | None):
        """One chat turn: answer, overlay, legend, table and downloads; the conversation continues while the
        image (slice, axis, window) stays the same."""
        gr = _gradio()
        state = dict(state or {})
        scan = state.get("scan")
        if scan is None:
            raise gr.Error("upload an image first (" + SUPPORTED + ")", print_exception=False)
        if not (question or "").strip():
            raise gr.Error("the question is empty: type a question about the image", print_exception=False)
        view = self._view(scan, slice_index, axis, window)
        chat = list(chat or [])
        if state.get("view") != view:  # another image: a new conversation
            state["history"], chat = [], []
        folder = self.request_folder()
        with _request_errors(gr, folder):
            result, answer, rgb = self.respond(scan, question, *view, state.get("history"), folder)
            overlay = draw_overlay(rgb, answer["regions"])
            overlay.save(folder / "overlay.png")
            files = [str(folder / f) for r in result["regions"] for f in r["mask_files"].values()]
            files += [str(folder / "answer.json"), str(folder / "overlay.png")]
        state["view"] = view
        state["history"] = [*state.get("history", []), {"from": "human", "value": question.strip()},
                            {"from": "gpt", "value": answer["text"]}]
        chat += [{"role": "user", "content": question.strip()},
                 {"role": "assistant", "content": readable_text(answer["text"], result["regions"]) or "(no answer)"}]
        try:
            yield (state, chat, str(folder / "overlay.png"), legend_html(result["regions"]),
                   table_rows(result["regions"]), files, "")
        finally:
            remove_folder(folder)

    def on_clear(self, state: dict | None):
        state = dict(state or {})
        state["history"], state["view"] = [], None
        return state, [], legend_html([]), []

    # ---------------------------------------------------------------------------- the page
    def build(self):
        """The Gradio Blocks app (not launched)."""
        gr = _gradio()
        os.environ["GRADIO_TEMP_DIR"] = str(self.root / "gradio")  # Gradio's upload/output cache: ours, private
        theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                                  font_mono=["ui-monospace", "Consolas", "monospace"])
        css = (".ms-legend{list-style:none;padding-left:0;margin:0} .ms-legend li{margin:2px 0}"
               ".ms-swatch{display:inline-block;width:14px;height:14px;border-radius:3px;vertical-align:middle}")
        self.theme, self.css = theme, css
        with gr.Blocks(title="medsight", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
            gr.Markdown("# medsight — ask about a scan, see what the answer points at")
            gr.Markdown(RESEARCH_NOTE, elem_id="ms-research-note")
            state = gr.State({}, time_to_live=self.session_ttl_s,
                             delete_callback=lambda s: remove_folder((s or {}).get("folder")))
            with gr.Row():
                with gr.Column(scale=1):
                    upload = gr.File(label=f"Scan: {SUPPORTED}", file_count="single", type="filepath",
                                     elem_id="ms-upload")
                    info = gr.Markdown("")
                    slice_slider = gr.Slider(0, 1, value=0, step=1, label="slice", visible=False, elem_id="ms-slice")
                    axis = gr.Radio([0, 1, 2], value=2, label="axis", visible=False)
                    window = gr.Dropdown(WINDOW_CHOICES, value="default", allow_custom_value=True,
                                         label="CT window (preset, or CENTER,WIDTH in HU)")
                    question = gr.Textbox(label="Question", lines=2, elem_id="ms-question",
                                          placeholder="e.g. Is there a tumor in the liver? Please segment it.")
                    gr.Examples([[q] for q in self.examples], inputs=[question], label="Example questions")
                    with gr.Row():
                        ask = gr.Button("Ask", variant="primary", elem_id="ms-ask")
                        clear = gr.Button("New conversation")
                with gr.Column(scale=1):
                    picture = gr.Image(label="Image and regions", type="filepath", interactive=False,
                                       elem_id="ms-overlay", format="png", buttons=["download", "fullscreen"])
                    legend = gr.HTML(legend_html([]), label="Legend")
                with gr.Column(scale=1):
                    chat = gr.Chatbot(label="Conversation", height=360, elem_id="ms-chat", buttons=["copy", "copy_all"],
                                      feedback_options=None)
                    table = gr.Dataframe(headers=TABLE_HEADERS, label="Regions", interactive=False,
                                         elem_id="ms-table")
                    downloads = gr.File(label="Downloads: masks, answer.json, overlay", file_count="multiple",
                                        interactive=False, elem_id="ms-downloads")
            with gr.Accordion("About this model", open=False):
                gr.Markdown(self.about or "(no export metadata)")
                gr.Markdown(f"Requests wait in one queue and run {self.concurrency} at a time (at most "
                            f"{self.max_queue} waiting). Uploads stay in a private folder for the session only "
                            "and are never logged; each answer's files are removed once sent.")
            hidden = gr.Column(visible=False)
            with hidden:  # the API endpoint's own (invisible) components
                api_file = gr.File(type="filepath")
                api_question = gr.Textbox()
                api_text, api_regions = gr.Textbox(), gr.JSON()
                api_files = gr.File(file_count="multiple")
                api_go = gr.Button()

            upload.change(self.on_upload, [upload, state],
                          [state, slice_slider, axis, picture, info, chat, legend, table, downloads],
                          api_visibility="private", concurrency_id="io")
            axis.change(self.on_axis, [axis, state], [slice_slider], api_visibility="private", concurrency_id="io")
            for trigger in (slice_slider.release, axis.change, window.change):
                trigger(self.on_view, [slice_slider, axis, window, state], [picture], api_visibility="private",
                        concurrency_id="io")
            ask_inputs = [question, slice_slider, axis, window, state, chat]
            ask_outputs = [state, chat, picture, legend, table, downloads, question]
            for trigger in (ask.click, question.submit):
                trigger(self.on_ask, ask_inputs, ask_outputs, api_visibility="private", concurrency_id="model",
                        concurrency_limit=self.concurrency)
            clear.click(self.on_clear, [state], [state, chat, legend, table], api_visibility="private")
            api_go.click(self.api_answer, [api_file, api_question], [api_text, api_regions, api_files],
                         api_name="answer", concurrency_id="model", concurrency_limit=self.concurrency,
                         api_description="(image file, question) -> (text, regions as in answer.json, "
                                         "[mask PNGs/NIfTI..., answer.json])")
        demo.queue(max_size=self.max_queue, default_concurrency_limit=self.concurrency)
        return demo

    def launch(self, demo, host: str = "127.0.0.1", port: int = 7860, auth: tuple[str, str] | None = None,
               block: bool = True):
        """Start the server (offline: no share link, no SSR, no MCP)."""
        warning = exposure_warning(host, auth)
        if warning:
            log.warning(warning)
        return demo.launch(server_name=host, server_port=port, auth=auth, share=False, inbrowser=False,
                           show_error=True, prevent_thread_lock=not block, quiet=not block, ssr_mode=False,
                           mcp_server=False, pwa=False, enable_monitoring=False, footer_links=["api"],
                           max_file_size="2gb", theme=self.theme, css=self.css)


SUPPORTED_NAME = {"image": "PNG/JPEG", "dicom": "DICOM", "dicom_series": "DICOM series", "nifti": "NIfTI"}


def exposure_warning(host: str, auth: Any) -> str | None:
    """The warning printed when the app is reachable from other machines without a login."""
    if host in LOCAL_HOSTS or auth is not None:
        return None
    return (f"serving on {host} without --auth: anyone who can reach this address can upload scans and use the "
            "model; pass --auth user:pass or bind 127.0.0.1")


def parse_auth(auth: str | None) -> tuple[str, str] | None:
    """'user:pass' -> (user, pass)."""
    if auth is None:
        return None
    user, sep, password = auth.partition(":")
    if not sep or not user or not password:
        raise DataError("--auth: expected USER:PASSWORD", field="auth")
    return user, password


def serve(export: str | Path, host: str = "127.0.0.1", port: int = 7860, device: str | None = None,
          auth: str | None = None, concurrency: int = 1) -> None:
    """Load the export once and serve the app until interrupted; the private work folder is removed at exit."""
    import torch

    import medsight

    credentials = parse_auth(auth)
    if not re.fullmatch(r"[\w.:\-\[\]]+", host):
        raise DataError(f"--host {host!r}: not a host name or address", field="host")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda: no CUDA device is available here", field="device")
    model = medsight.load(export, device=device)
    app = MedSightApp(model, export, concurrency=concurrency)
    atexit.register(app.close)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` also removes the private folder
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up probes of its local URL
    demo = app.build()
    log.info("medsight serve: export %s on %s, http://%s:%d (%d request(s) at a time)", export, device, host, port,
             app.concurrency)
    try:
        app.launch(demo, host, port, credentials, block=True)
    finally:
        app.close()


__all__ = ["MedSightApp", "about_markdown", "exposure_warning", "legend_html", "parse_auth", "readable_text",
           "serve", "table_rows"]
