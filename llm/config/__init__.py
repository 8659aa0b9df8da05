"""The experiment schema: typed dataclasses, loaded from YAML with dotted overrides.

One experiment is one `Config` tree. YAML files in `configs/` set some of its fields;
`key.path=value` arguments on the command line override them. Every key and type is
checked against the dataclasses, and every error is one line naming the key.

    schema.py     the sections (model, data, train, parallel, log, eval) and `Config`
    routing.py    model.routing: the shared keys and the base of a router's own section
    errors.py     ConfigError and the checks of single values
    files.py      reading an experiment or a saved config, writing one
    overrides.py  `key.path=value` arguments
    parse.py      raw mapping → typed tree, with `imports` and one-line errors
    migration.py  saved configs of earlier versions → today's schema
"""
# check_choice and check_positive too: router modules (plug-ins included) check their own sections with them.
from llm.config.errors import ConfigError, check_choice, check_positive
from llm.config.files import load_config, load_saved_config, save_config, to_dict
from llm.config.migration import migrate_saved
from llm.config.parse import from_dict, import_modules
from llm.config.routing import RouterOptions, RoutingConfig, routing_section
from llm.config.schema import Config, DataConfig, EvalConfig, LogConfig, ModelConfig, ParallelConfig, TrainConfig

__all__ = [
    "Config", "ConfigError", "DataConfig", "EvalConfig", "LogConfig", "ModelConfig", "ParallelConfig",
    "RouterOptions", "RoutingConfig", "TrainConfig", "check_choice", "check_positive", "from_dict", "import_modules",
    "load_config", "load_saved_config", "migrate_saved", "routing_section", "save_config", "to_dict",
]
