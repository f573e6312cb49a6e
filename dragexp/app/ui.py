"""The Gradio UI of the interactive editor (``python scripts/app.py``).

Upload an image (or pick a built-in sample), paint the editable region in white on the mask
canvas, click handle then target points on the drag canvas (numbered arrows), pick a method and
its main parameters, run. The result appears beside the source with the handle trajectories,
downloadable; "Save as sample" writes the input in the DragBench layout. All the work is done by
:class:`dragexp.app.editor.Editor`, i.e. by the same config and ``method.edit`` as a training job.
"""

from __future__ import annotations

import atexit
import hashlib
import io
import logging
import os
import shlex
import shutil
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from ..data import SampleError  # noqa: E402
from ..drag.trackers import BorderError  # noqa: E402
from ..reporting.drawing import HANDLE_COLOR, OUTLINE_COLOR, draw_drag  # noqa: E402
from .editor import PARAMS, Editor, InputError, check_points, fit_image  # noqa: E402

__all__ = ["build_ui", "launch"]

log = logging.getLogger("dragexp.app")
DISPLAY = 384   # small images are shown (and clicked) at an integer scale up to this side
_RENDER_DIR: Path | None = None

CSS = """
#points img, #result img, #upload img { image-rendering: pixelated; }
#status { min-height: 2.2em; }
"""


# -- pictures ------------------------------------------------------------------------------

def display_scale(image: np.ndarray | None) -> int:
    if image is None:
        return 1
    return max(1, DISPLAY // max(image.shape[:2]))


def upscale(image: np.ndarray, s: int) -> np.ndarray:
    return image if s == 1 else np.repeat(np.repeat(image, s, axis=0), s, axis=1)


def render_points(image: np.ndarray | None, points: list, mask: np.ndarray | None):
    """The drag canvas: the image at display scale, mask tinted, numbered arrows, a pending
    handle (a click without its target yet) as a red dot."""
    if image is None:
        return None
    s = display_scale(image)
    pts = [((x + 0.5) * s - 0.5, (y + 0.5) * s - 0.5) for x, y in points]
    n = len(pts) // 2 * 2
    big_mask = upscale(mask, s) if mask is not None and mask.any() else None
    out = draw_drag(upscale(image, s), pts[0:n:2], pts[1:n:2], mask=big_mask)
    if len(pts) % 2:
        pil = Image.fromarray(out)
        x, y = pts[-1]
        r = max(3, round(min(out.shape[:2]) / 64))
        ImageDraw.Draw(pil).ellipse([x - r, y - r, x + r, y + r], fill=HANDLE_COLOR,
                                    outline=OUTLINE_COLOR)
        out = np.asarray(pil)
    return out


def render_result(outcome) -> np.ndarray:
    """The edited image at display scale with the clicked arrows and the handle trajectories."""
    res = outcome.result
    s = display_scale(res.image)

    def sc(p):
        return ((p[0] + 0.5) * s - 0.5, (p[1] + 0.5) * s - 0.5)

    traj = res.trajectory_xy
    per_handle = [[sc(step[i]) for step in traj] for i in range(len(traj[0]))] if traj else None
    return draw_drag(upscale(res.image, s), [sc(p) for p in res.handles_xy],
                     [sc(p) for p in res.targets_xy], per_handle)


def editor_value(image: np.ndarray | None, base_mask: np.ndarray | None):
    """The mask canvas: the image as background, a mask it starts from (a built-in sample's)
    tinted white on it, and an empty layer to paint on. (Gradio's editor does not show layers
    set from Python, so a starting mask lives in the background and strokes add to it.)"""
    if image is None:
        return None
    s = display_scale(image)
    bg = upscale(image, s)
    if base_mask is not None and base_mask.any():
        m = upscale(base_mask, s) > 0
        bg = bg.copy()
        bg[m] = (0.4 * bg[m] + 0.6 * 255).astype(np.uint8)
    return {"background": _png(bg), "layers": [], "composite": None}


def mask_from_editor(value, image: np.ndarray | None,
                     base_mask: np.ndarray | None = None) -> np.ndarray | None:
    """uint8 (H, W) mask at the source image's size: 1 = painted or in ``base_mask``."""
    if image is None:
        return None
    h, w = image.shape[:2]
    base = (np.zeros((h, w), np.uint8) if base_mask is None or base_mask.shape != (h, w)
            else (base_mask > 0).astype(np.uint8))
    painted = None
    for layer in (value or {}).get("layers") or []:
        if layer is None:
            continue
        a = np.asarray(layer)
        a = a[..., 3] if a.ndim == 3 and a.shape[2] == 4 else (a.max(axis=-1) if a.ndim == 3 else a)
        painted = a > 0 if painted is None else painted | (a > 0)
    if painted is None or not painted.any():
        return base
    small = Image.fromarray(painted.astype(np.uint8) * 255).resize((w, h), Image.BOX)
    return base | (np.asarray(small) >= 128).astype(np.uint8)


def _png(image: np.ndarray | None) -> str | None:
    """A PNG file for an output image, named by its content.

    Handlers return files rather than arrays: Gradio rewrites an array's cache file every time
    the same picture is output again, and a browser reading it at that moment gets a truncated
    image; a file already in its cache is reused as it is.
    """
    global _RENDER_DIR
    if image is None:
        return None
    if _RENDER_DIR is None:
        _RENDER_DIR = Path(tempfile.mkdtemp(prefix="dragexp-app-"))
        atexit.register(shutil.rmtree, _RENDER_DIR, True)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    data = buf.getvalue()
    path = _RENDER_DIR / f"{hashlib.sha1(data).hexdigest()}.png"
    if not path.exists():
        fd, tmp = tempfile.mkstemp(dir=_RENDER_DIR, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    return str(path)


def points_png(image: np.ndarray | None, points: list, mask: np.ndarray | None) -> str | None:
    return _png(render_points(image, points, mask))


def points_text(points: list) -> str:
    if not points:
        return "No points yet: click a handle, then its target."
    pairs = len(points) // 2
    text = f"{pairs} handle/target pair{'s' if pairs != 1 else ''}"
    if len(points) % 2:
        text += f" + handle {pairs + 1}: now click its target"
    return text + "."


# -- the app -------------------------------------------------------------------------------

def build_ui(editor: Editor) -> gr.Blocks:
    builtin = editor.builtin_samples()
    method_defaults = editor.method_params(editor.default_method)
    res = editor.resolution

    with gr.Blocks(title="dragexp editor", analytics_enabled=False) as demo:
        gr.Markdown(
            f"### dragexp interactive editor\nModel **{editor.models.source}** "
            f"(resolution {res}); images larger than {res} px are scaled down. "
            "1) upload an image or pick a built-in sample, 2) paint the editable region white "
            "(optional), 3) click a handle, then its target (repeat for more pairs), 4) run.")
        image_st = gr.State(None)
        points_st = gr.State([])
        mask_st = gr.State(None)
        base_mask_st = gr.State(None)   # the mask the canvas started from

        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=240):
                upload = gr.Image(label="1. Upload image", type="numpy", sources=["upload", "clipboard"],
                                  elem_id="upload", height=220, format="png")
                sample_dd = gr.Dropdown(choices=list(builtin.names), value=None,
                                        label="... or a built-in sample", elem_id="builtin")
                prompt = gr.Textbox(label="Prompt", elem_id="prompt", lines=1)
            with gr.Column(scale=2, min_width=300):
                mask_ed = gr.ImageEditor(
                    label="2. Mask: paint the editable region (white)", type="numpy",
                    sources=(), transforms=(), layers=False, elem_id="mask", height=300,
                    brush=gr.Brush(colors=["#ffffff"], default_color="#ffffff",
                                   color_mode="fixed", default_size=max(8, DISPLAY // 16)),
                    eraser=gr.Eraser(default_size=max(8, DISPLAY // 16)), format="png")
                clear_mask = gr.Button("Clear mask", size="sm", elem_id="clear-mask")

        with gr.Row(equal_height=False):
            with gr.Column(min_width=300):
                points_view = gr.Image(label="3. Click handle, then target", interactive=False,
                                       elem_id="points", height=DISPLAY, format="png",
                                       buttons=[])
                points_md = gr.Markdown(points_text([]), elem_id="points-text")
                with gr.Row():
                    undo = gr.Button("Undo point", size="sm", elem_id="undo")
                    clear_pts = gr.Button("Clear points", size="sm", elem_id="clear-points")
            with gr.Column(min_width=300):
                result_view = gr.Image(label="Result (handle trajectories in yellow)",
                                       interactive=False, elem_id="result", height=DISPLAY,
                                       format="png", buttons=["fullscreen"])
                download = gr.File(label="Download result", elem_id="download", interactive=False)

        with gr.Row(equal_height=True):
            method_dd = gr.Dropdown(choices=editor.method_names, value=editor.default_method,
                                    label="Method", elem_id="method", scale=2)
            param_boxes = {}
            for key, label in PARAMS.items():
                v = method_defaults.get(key)
                kw = dict(label=label, elem_id=f"param-{key}", interactive=v is not None,
                          value=v, scale=1, min_width=110)
                if key in ("n_pix_step", "lora_steps"):
                    param_boxes[key] = gr.Number(precision=0, minimum=0, **kw)
                elif key == "inversion_strength":
                    param_boxes[key] = gr.Number(minimum=0.0, maximum=1.0, step=0.05, **kw)
                else:
                    param_boxes[key] = gr.Number(minimum=0.0, step=0.001, **kw)
            run_btn = gr.Button("4. Run", variant="primary", elem_id="run", scale=1)
        more = gr.Textbox(label="More overrides (method.<key>=<value>, space-separated)",
                          placeholder="method.lam=0.2 method.denoise.end_step=10", elem_id="more")
        status = gr.Markdown("", elem_id="status")

        with gr.Accordion("Save as sample (DragBench layout)", open=False, elem_id="save-acc"):
            with gr.Row():
                save_dir = gr.Textbox(value=str(editor.samples_dir), label="Folder (data.root)",
                                      elem_id="save-dir", scale=3)
                save_cat = gr.Textbox(value="app", label="Category", elem_id="save-category")
                save_name = gr.Textbox(value=_default_name(), label="Name", elem_id="save-name")
                save_btn = gr.Button("Save as sample", elem_id="save", scale=1)

        # -- events ------------------------------------------------------------------------
        def new_image(image, points, mask, text):
            return (image, points, mask, mask, editor_value(image, mask),
                    points_png(image, points, mask), points_text(points), text)

        image_outputs = [image_st, points_st, mask_st, base_mask_st, mask_ed, points_view,
                         points_md, status]

        def on_upload(img):
            if img is None:
                return None, [], None, None, None, None, points_text([]), ""
            image = fit_image(img, res)
            mask = np.zeros(image.shape[:2], np.uint8)
            h, w = image.shape[:2]
            note = f"Image {w}x{h}" + (f" (scaled down from {img.shape[1]}x{img.shape[0]})"
                                        if image.shape != img.shape else "") + "."
            return new_image(image, [], mask, note)

        upload.upload(on_upload, upload, image_outputs)
        upload.clear(on_upload, upload, image_outputs)

        def on_builtin(name):
            if not name:
                return (gr.update(),) * 10
            s = builtin[list(builtin.names).index(name)]
            pts = [[int(round(x)), int(round(y))] for x, y in s.points]
            return (*new_image(s.image, pts, s.mask.copy(), f"Built-in sample {name}."),
                    _png(s.image), s.prompt)

        sample_dd.input(on_builtin, sample_dd, image_outputs + [upload, prompt])

        def on_mask(value, image, points, old, base):
            mask = mask_from_editor(value, image, base)
            if mask is None or (old is not None and np.array_equal(mask, old)):
                return gr.update(), gr.update()     # unchanged (e.g. the canvas was just set)
            return mask, points_png(image, points, mask)

        mask_ed.change(on_mask, [mask_ed, image_st, points_st, mask_st, base_mask_st],
                       [mask_st, points_view])

        def on_clear_mask(image, points):
            if image is None:
                return None, None, None, None
            mask = np.zeros(image.shape[:2], np.uint8)
            return mask, mask, editor_value(image, mask), points_png(image, points, mask)

        clear_mask.click(on_clear_mask, [image_st, points_st],
                         [mask_st, base_mask_st, mask_ed, points_view])

        def on_click(image, points, mask, evt: gr.SelectData):
            if image is None:
                return points, None, points_text(points)
            s = display_scale(image)
            h, w = image.shape[:2]
            x = min(max(int(evt.index[0] // s), 0), w - 1)
            y = min(max(int(evt.index[1] // s), 0), h - 1)
            points = list(points) + [[x, y]]
            return points, points_png(image, points, mask), points_text(points)

        points_view.select(on_click, [image_st, points_st, mask_st],
                           [points_st, points_view, points_md])

        def on_undo(image, points, mask):
            points = list(points)[:-1]
            return points, points_png(image, points, mask), points_text(points)

        undo.click(on_undo, [image_st, points_st, mask_st], [points_st, points_view, points_md])
        clear_pts.click(lambda image, mask: ([], points_png(image, [], mask), points_text([])),
                        [image_st, mask_st], [points_st, points_view, points_md])

        def on_method(name):
            try:
                values = editor.method_params(name)
            except Exception as exc:  # a method config the command-line overrides do not fit
                gr.Warning(f"Method {name}: {_short(exc)}")
                return [gr.update() for _ in PARAMS]
            return [gr.update(value=values.get(k), interactive=k in values) for k in PARAMS]

        method_dd.input(on_method, method_dd, list(param_boxes.values()))

        def on_run(image, points, mask, text, method, extra, *values, progress=gr.Progress()):
            params = {k: v for k, v in zip(PARAMS, values) if v is not None}
            for k in ("n_pix_step", "lora_steps"):
                if k in params:
                    params[k] = int(params[k])
            try:
                check_points(points, image is not None)
                try:
                    overrides = shlex.split(extra or "")
                except ValueError as exc:
                    raise InputError(f"More overrides: {exc}") from None
                outcome = editor.run(image, points, mask, text, method, params,
                                     report=lambda f, d: progress(f, desc=d),
                                     overrides=overrides)
            except (InputError, SampleError, BorderError, ValueError) as exc:
                gr.Warning(_short(exc))
                return gr.update(), gr.update(), f"**Cannot run:** {_short(exc)}"
            except Exception as exc:  # noqa: BLE001 - the UI shows a message, the log the trace
                log.error("edit failed:\n%s", traceback.format_exc())
                gr.Warning(f"Edit failed: {_short(exc)}")
                return gr.update(), gr.update(), f"**Edit failed:** {_short(exc)} (details in the log)"
            r = outcome.result
            t = r.timings
            stages = ", ".join(f"{k} {t[k]:.1f} s" for k in ("lora", "inversion", "optimisation",
                                                            "denoising") if k in t)
            msg = (f"**Done** in {outcome.seconds:.1f} s with {outcome.method}: {r.num_steps} drag "
                   f"step{'s' if r.num_steps != 1 else ''}"
                   f"{' (targets reached)' if r.stopped_early else ''}; {stages}. "
                   f"Files: `{outcome.folder}`")
            return _png(render_result(outcome)), str(outcome.folder / "dragged_image.png"), msg

        run_btn.click(on_run, [image_st, points_st, mask_st, prompt, method_dd, more,
                               *param_boxes.values()], [result_view, download, status],
                      concurrency_limit=1, show_progress_on=[result_view])

        def on_save(image, points, mask, text, folder, category, name):
            try:
                path = editor.save_sample(image, points, mask, text, category.strip(),
                                          name.strip(), root=folder.strip() or None)
            except (InputError, SampleError, OSError) as exc:
                gr.Warning(_short(exc))
                return f"**Cannot save:** {_short(exc)}", gr.update()
            root = path.parent.parent
            return (f"**Saved** sample `{category}/{name}` in `{root}`; run it with "
                    f"`python scripts/train.py data=dragbench data.root={root}`", _default_name())

        save_inputs = [image_st, points_st, mask_st, prompt, save_dir, save_cat, save_name]
        save_btn.click(on_save, save_inputs, [status, save_name])
        save_name.submit(on_save, save_inputs, [status, save_name])   # Enter in the name box
    return demo


def _default_name() -> str:
    return time.strftime("sample_%Y%m%d_%H%M%S")


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if isinstance(exc, (InputError, SampleError)) else f"{type(exc).__name__}: {text}"


def launch(editor: Editor, host: str = "127.0.0.1", port: int | None = None, **kwargs):
    """Build the UI and serve it (blocks until interrupted unless ``prevent_thread_lock``)."""
    demo = build_ui(editor)
    demo.queue(default_concurrency_limit=1)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    return demo, demo.launch(
        server_name=host, server_port=port, ssr_mode=False, theme=theme, css=CSS,
        allowed_paths=[str(editor.out_dir), str(editor.samples_dir)], show_error=False,
        footer_links=[], **kwargs)
