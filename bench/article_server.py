"""The article's serving approach, reproduced as the serving benchmark's baseline.

    python bench/article_server.py --base BASE --adapter ADAPTER --port PORT --tokens N

As in the article (section 五.1): FastAPI, the base model with the LoRA adapter applied by peft
(unmerged), a synchronous `/predict` endpoint that runs `model.generate` once per request (no
batching; FastAPI runs sync endpoints in its thread pool, so concurrent requests run concurrent
`generate` calls), the `human: ... gpt: ` prompt, sampling at temperature 0.7, bfloat16 weights
(what the article's `from_pretrained` without a dtype loads for this checkpoint under transformers
5, and what vLLM runs). Changed for a fair benchmark: exactly N new tokens per request
(min_new_tokens = max_new_tokens = N, as the vLLM runs use ignore_eos), and the reply also says
how many tokens it generated. /health answers when the model is loaded.
"""

# No `from __future__ import annotations`: FastAPI must see the real QueryRequest class of the
# endpoint's signature, which is local to build_app.
import argparse


def build_app(base: str, adapter: str, tokens: int):
    import torch
    from fastapi import FastAPI
    from peft import PeftModel
    from pydantic import BaseModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(base_model, adapter).eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    app = FastAPI()

    class QueryRequest(BaseModel):
        question: str

    @app.get("/health")
    def health() -> dict:
        return {"ok": True}

    @app.post("/predict")
    def predict(request: QueryRequest) -> dict:
        prompt = f"human: {request.question}\ngpt: "
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            outputs = model.generate(
                **inputs,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                temperature=0.7,
                do_sample=True,
            )
        new = outputs[0][inputs["input_ids"].shape[1] :]
        response = tokenizer.decode(outputs[0], skip_special_tokens=True).split("gpt: ")[-1]
        return {"response": response, "tokens": int(new.shape[0])}

    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=int, required=True)
    args = parser.parse_args()
    app = build_app(args.base, args.adapter, args.tokens)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
