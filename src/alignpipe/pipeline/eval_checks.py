"""`validate`'s checks of a stage's `eval:` block, before anything trains: the prompts file reads, every
verifier imports, a judge model folder exists, a judge endpoint answers (and its key variable is set), a
judging prompt has its placeholders, lm-eval is installed and its task folder exists."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

from alignpipe.data.loading import HUB_ID
from alignpipe.errors import EvalError, RecipeError
from alignpipe.eval.judges import load_verifier
from alignpipe.eval.lm_eval import require_lm_eval
from alignpipe.eval.prompts import read_prompt_file, resolve
from alignpipe.eval.safety_suites import check_safety

PLACEHOLDERS = ("{prompt}", "{a}", "{b}")


def check_eval(recipe, name: str, where: str) -> None:
    spec, key = recipe.stages[name].eval, f"stages.{name}.eval"
    if not spec.enabled:
        return
    try:
        if spec.prompts:
            read_prompt_file(resolve(spec.prompts, recipe.path), f"{key}.prompts")
        check_safety(spec.safety, recipe.path, f"{key}.safety", manners=recipe.world.get("safety") is True)
    except EvalError as err:
        raise EvalError(err.what, where=where, key=err.key, fix=err.fix) from None
    for jname, j in spec.judges.items():
        jkey = f"{key}.judges.{jname}"
        given = [k for k in ("verifier", "model", "endpoint") if getattr(j, k)]
        if not given or (j.verifier and len(given) > 1):
            raise RecipeError("a judge is a `verifier: module:function`, or a pairwise judge model (`model:` a folder "
                              "or hub id, or `endpoint:` a base URL with `model:` its name)", where=where, key=jkey,
                              fix="give exactly one of verifier / model / endpoint")
        if j.verifier:
            load_verifier(j.verifier, where, f"{jkey}.verifier")
            continue
        if j.prompt_template:
            path = resolve(j.prompt_template, recipe.path)
            if not path.is_file():
                raise RecipeError(f"judging prompt {path} not found", where=where, key=f"{jkey}.prompt_template",
                                  fix="give a text file with {prompt}, {a} and {b}")
            missing = [p for p in PLACEHOLDERS if p not in path.read_text()]
            if missing:
                raise RecipeError(f"judging prompt {path} lacks {', '.join(missing)}", where=where,
                                  key=f"{jkey}.prompt_template", fix="put {prompt}, {a} and {b} where they go")
        if j.endpoint:
            _check_endpoint(j, where, jkey)
        else:
            _check_judge_model(j.model, where, f"{jkey}.model")
    if spec.lm_eval is not None:
        require_lm_eval(where, f"{key}.lm_eval")
        if spec.lm_eval.include_path and not resolve(spec.lm_eval.include_path, recipe.path).is_dir():
            raise RecipeError(f"task folder {spec.lm_eval.include_path} not found", where=where,
                              key=f"{key}.lm_eval.include_path", fix="give a folder of lm-eval task YAMLs")


def _check_judge_model(model: str, where: str, key: str) -> None:
    local = Path(model).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise RecipeError(f"judge model folder {model} has no config.json", where=where, key=key,
                              fix="point it at a folder written by save_pretrained")
        return
    if local.exists() or model.startswith((".", "/", "~")) or not HUB_ID.match(model):
        raise RecipeError(f"judge model {model} does not exist", where=where, key=key,
                          fix="give a local model folder or a hub id (org/name)")


def _check_endpoint(j, where: str, key: str) -> None:
    if j.api_key_env and not os.environ.get(j.api_key_env):
        raise RecipeError(f"environment variable {j.api_key_env} (the judge endpoint's key) is not set", where=where,
                          key=f"{key}.api_key_env", fix=f"export {j.api_key_env}=... before running")
    url = j.endpoint.rstrip("/") + "/models"
    headers = {"Authorization": "Bearer " + os.environ[j.api_key_env]} if j.api_key_env else {}
    try:
        from alignpipe.eval.judges import open_without_redirects  # the key never follows a redirect

        with open_without_redirects(urllib.request.Request(url, headers=headers), min(10, j.timeout_s)) as r:
            json.loads(r.read().decode() or "{}")
    except urllib.error.HTTPError:
        return  # it answered (some servers have no /models): the first judging call tells the rest
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = str(getattr(err, "reason", err)).splitlines()[0][:120]
        raise RecipeError(f"judge endpoint {j.endpoint} does not answer ({reason})", where=where,
                          key=f"{key}.endpoint", fix="start the server (vLLM, llama.cpp, Ollama) or correct the URL") \
            from None
