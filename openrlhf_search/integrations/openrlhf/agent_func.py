"""The file passed to OpenRLHF as ``--train.agent_func_path``.

OpenRLHF executes this file with ``spec_from_file_location`` under the throw-away name ``agent_module`` without
registering it in ``sys.modules``; module-level dataclasses (and any second copy of module state) would break there.
So the agent lives in the importable module :mod:`openrlhf_search.integrations.openrlhf.agent`, and this file only
re-exports the executor class OpenRLHF looks up by name.
"""

from openrlhf_search.integrations.openrlhf.agent import AgentExecutor

__all__ = ["AgentExecutor"]
