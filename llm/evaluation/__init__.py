"""Evaluation of checkpoints: lm-evaluation-harness tasks and held-out text perplexity.

One module per job:
- `adapter`: `LLMEvalModel`, our model as an lm-eval LM (registered as the model name `llm`);
- `tasks`: task names -> lm-eval task configs, local task files and their data directory;
- `runner`: `run_eval` and `llm eval` (results JSON and markdown table);
- `perplexity`: `llm eval --text`, text files scored like lm-eval's wikitext task;
- `callback`: `EvalCallback`, tasks every `eval.every` steps during training.

Importing this package imports lm-eval and registers `llm` with it, so code that
may run without evaluation (`llm train`) imports it only once evaluation is asked for.
"""
from llm.evaluation.adapter import LLMEvalModel
from llm.evaluation.callback import EvalCallback
from llm.evaluation.errors import EvalError
from llm.evaluation.perplexity import TextError
from llm.evaluation.runner import evaluate, main, markdown, run_eval, summarize
from llm.evaluation.tasks import TaskSet, data_root, local_tasks, resolve_tasks, task_config

__all__ = ["EvalCallback", "EvalError", "LLMEvalModel", "TaskSet", "TextError", "data_root", "evaluate",
           "local_tasks", "main", "markdown", "resolve_tasks", "run_eval", "summarize", "task_config"]
