"""The HTTP front-end process: an OpenAI-compatible server over the coordinator (protocol/serving.py).

  __main__.py        the process: flags, the link to the coordinator, uvicorn
  settings.py        every default of the front-end (FrontEndConfig)
  engine_client.py   the link's asyncio side: submit, token streams (each token once), cancel, state
  app.py             the FastAPI app and its operational endpoints (/health, /v1/models, /version, /metrics)
  completions.py     POST /v1/completions
  chat.py            POST /v1/chat/completions
  chat_template.py   messages to prompt ids with the checkpoint's chat template
  schemas.py         the request bodies; params.py their checks and the Submit; prompts.py the prompts
  context.py         what the handlers share; model check and admission (429, 503)
  generation.py      one prompt's request from Submit to its end, as text events
  detokenize.py      tokens to final text (no split characters, stop strings held back)
  responses.py       whole responses and SSE chunk streams; streaming.py SSE framing and disconnects
  api_errors.py      every error in OpenAI's shape
  metrics.py         per-request metrics; engine_metrics.py the EngineState mirror
"""
