"""Any agent program, trained through an OpenAI-compatible gateway (docs/design.md, Episodes,
"Agents through the OpenAI gateway").

- `openai_server.py`: `Gateway`, the HTTP server on 127.0.0.1 with a base URL per episode;
- `agent_episode.py`: `AgentEpisode`, one episode's calls: history checked against the
  episode's context, new messages rendered on top of its exact ids, a model turn per call,
  branches when the agent forks, OpenAI-shaped answers;
- `openai_messages.py`: chat messages in normal form, tool calls parsed from the model's text;
- `agent_workflow.py`: `AgentWorkflow`, `task.agent=module:function` played as episodes;
- `example_agent.py`: a shipped agent written with the `openai` client.
"""
