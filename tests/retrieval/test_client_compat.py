"""Every search-agent framework's own retrieval client, run unchanged against ``openrlhf-search serve``'s app.

The clients' files are vendored under ``tests/retrieval/clients/`` (licence and upstream commit in
``clients/README.md``); only the server address and retry counts are set at call time. Each client makes five
calls: a normal one, an empty batch (an empty query for the one-query clients), a non-ASCII query, a query longer
than the server's ``max_query_chars`` (truncated, answered) and ``topk`` 10. The corpus rows carry the extra fields
real corpora have (``url``, ``wikipedia_title``), which ASearcher's and AReaL's clients read.

The compatibility table in ``docs/retrieval.md`` is rendered from :data:`CLIENTS` and :data:`CASES`;
``test_docs_table_is_current`` keeps it equal (``python tests/retrieval/test_client_compat.py --write`` rewrites it).
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import importlib.util
import io
import json
import sys
import types
from pathlib import Path

import pytest

from openrlhf_search.retrieval.corpus import write_corpus_jsonl
from openrlhf_search.retrieval.server import RetrievalServer, ServerConfig
from openrlhf_search.retrieval.types import Document

CLIENTS_DIR = Path(__file__).parent / "clients"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "retrieval.md"
LONG = "capital of France " * 320  # 5,760 characters: above max_query_chars (4,096), as a model in training writes
MAX_QUERY_CHARS = 4096

# (key, title, text): the pages of the corpus; Paris has two passages (one page, one url)
PAGES = [
    ("paris", "Paris", "Paris is the capital and most populous city of France, on the river Seine."),
    ("paris-2", "Paris", "Paris hosted the Summer Olympic Games in 1900, 1924 and 2024."),
    ("berlin", "Berlin", "Berlin is the capital of Germany and its largest city by population."),
    ("everest", "Mount Everest", "Mount Everest is Earth's highest mountain above sea level, in the Himalayas."),
    ("hamlet", "Hamlet", "Hamlet is a tragedy written by William Shakespeare around 1600."),
    ("zurich", "Zürich", "Zürich ist die größte Stadt der Schweiz; 東京 (Tokyo) ist ihre Partnerstadt."),
    ("amazon", "Amazon River", "The Amazon River in South America is the largest river by discharge volume."),
]
NON_ASCII = "größte Stadt der Schweiz 東京"


def _rows() -> list[Document]:
    docs = []
    for key, title, text in PAGES:
        url = "https://en.wikipedia.org/wiki/" + title.replace(" ", "_")
        docs.append(Document(key, f'"{title}"\n{text}', {"url": url, "wikipedia_title": title}))
    for i in range(40):  # filler, so that idf means something and topk 10 has 10 hits
        docs.append(Document(f"filler-{i}", f'"Filler {i}"\nfiller passage number {i} about capital rivers',
                             {"url": f"https://example.org/filler/{i}", "wikipedia_title": f"Filler {i}"}))
    return docs


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from openrlhf_search.retrieval.bm25 import BM25Index, BM25Retriever

    tmp = tmp_path_factory.mktemp("compat")
    corpus = tmp / "corpus.jsonl"
    write_corpus_jsonl(_rows(), corpus)
    BM25Index.build(corpus, tmp / "index")
    cfg = ServerConfig(port=0, max_query_chars=MAX_QUERY_CHARS)  # every other limit as shipped
    with RetrievalServer(BM25Retriever.from_dir(tmp / "index"), cfg) as srv:
        yield srv


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------- the clients
# Each runner: (server url, query or list of queries, topk) -> the text / objects the client hands to its agent.


def skyrl_gym_search(url: str, query: str, topk: int) -> str:
    """SkyRL-gym 0.4.0 ``SearchToolGroup.search``: posts ``{"query": q, "topk", "return_scores": true}``, reads
    ``result`` as a list of hit lists and each hit's ``document.contents``."""
    sys.path.insert(0, str(CLIENTS_DIR / "skyrl_gym"))
    try:
        from skyrl_gym.tools import search
    finally:
        sys.path.pop(0)
    search.MAX_RETRIES = 1  # a failure fails the test at once instead of after 10 retries
    tool = search.SearchToolGroup(search_url=f"{url}/retrieve", topk=topk, log_requests=False)
    return json.loads(tool.search(query))["result"]


def _skyrl_agent_module():
    """skyrl-agent's ``tools.base`` imports litellm, json5 and jsonschema only for tool schemas; stand-ins for those
    three let the unchanged ``local_search.py`` and ``base.py`` import."""
    if "skyrl_agent.tools.local_search" in sys.modules:
        return sys.modules["skyrl_agent.tools.local_search"]
    litellm = types.ModuleType("litellm")
    litellm.ChatCompletionToolParam = litellm.ChatCompletionToolParamFunctionChunk = dict
    json5 = types.ModuleType("json5")
    json5.loads = json.loads
    jsonschema = types.ModuleType("jsonschema")
    jsonschema.validate = lambda instance, schema: None
    jsonschema.exceptions = types.SimpleNamespace(SchemaError=ValueError, ValidationError=ValueError)
    for name, module in (("litellm", litellm), ("json5", json5), ("jsonschema", jsonschema)):
        sys.modules.setdefault(name, module)
    sys.path.insert(0, str(CLIENTS_DIR / "skyrl_agent"))
    try:
        from skyrl_agent.tools import local_search
    finally:
        sys.path.pop(0)
    local_search.MAX_RETRIES = 1
    return local_search


def skyrl_agent_local_search(url: str, query: str, topk: int) -> str:
    """skyrl-agent ``LocalSearchTool.call``: posts ``{"queries": [q], "topk", "return_scores": true}`` to
    ``$LOCAL_SEARCH_URL``, asserts one result list, formats ``document.contents``."""
    local_search = _skyrl_agent_module()
    env = {"LOCAL_SEARCH_URL": f"{url}/retrieve", "LOCAL_SEARCH_TOP_K": str(topk)}
    with _environ(env), contextlib.redirect_stdout(io.StringIO()):
        return local_search.LocalSearchTool().call({"query": query})


def rllm_local_retrieval(url: str, query: str, topk: int) -> str:
    """rLLM deepresearch ``LocalRetrievalTool.run``: posts ``{"query": q, "top_k": k}``, reads ``results`` (each
    ``id``, ``score`` and ``content``: the row, whose ``contents`` it formats)."""
    module = _load(CLIENTS_DIR / "rllm" / "tool.py", "rllm_deepresearch_tool")
    tool = module.LocalRetrievalTool(server_url=url, url_file=None, max_results=max(topk, 10))
    return asyncio.run(tool.run(query, top_k=topk))


def _asearcher_client(url: str, tmp: Path):
    module = _load(CLIENTS_DIR / "asearcher" / "search_utils.py", "asearcher_search_utils")
    (tmp / "Host0_IP0.txt").write_text(url.removeprefix("http://"))
    with _environ({"RAG_SERVER_ADDR_DIR": str(tmp)}):
        return module.AsyncSearchBrowserClient()


def asearcher_search(url: str, queries: list[str], topk: int, tmp: Path) -> list[dict]:
    """ASearcher ``AsyncSearchBrowserClient.query_async``: posts ``{"queries", "topk", "return_scores": false}``,
    reads each hit's ``contents`` and ``url``."""
    client = _asearcher_client(url, tmp)
    request = {"queries": queries, "topk": topk, "return_scores": False}
    return asyncio.run(asyncio.wait_for(client.query_async(request), 30))  # it retries 10 x 10 s on any error


def asearcher_access(url: str, urls: list[str], tmp: Path) -> list[dict]:
    """ASearcher ``access_async``: posts ``{"urls": [...]}`` to ``/access``, reads ``result[i]["contents"]``."""
    client = _asearcher_client(url, tmp)
    return asyncio.run(asyncio.wait_for(client.access_async(urls), 30))


def areal_notebook_search(url: str, query: str, topk: int) -> str:
    """AReaL's search-agent notebook: its ``call_search_tool`` cell (``queries``/``topk``/``return_scores: false``,
    reads ``result``), then its workflow's two lines that search and format each hit's ``wikipedia_title`` and
    ``contents``. Only the server address in the cell is replaced."""
    cells = json.loads((CLIENTS_DIR / "areal_notebook" / "asearcher_cells.json").read_text(encoding="utf-8"))["cells"]
    setup = cells["15"].replace('"localhost:5001"', repr(url.removeprefix("http://")))
    lines = [line.strip() for line in cells["33"].splitlines()]
    search_line = next(line for line in lines if line.startswith("search_results = (await call_search_tool("))
    format_line = next(line for line in lines if line.startswith("search_results_str = "))
    if topk != 3:  # the workflow hard-codes topk=3; other topk values call the same function with that topk
        search_line = search_line.replace("topk=3", f"topk={topk}")
    namespace: dict = {"search_query": query}

    async def run() -> None:
        flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
        with contextlib.redirect_stdout(io.StringIO()):
            for source in (setup, search_line):
                result = eval(compile(source, "<areal-notebook>", "exec", flags=flags), namespace)
                if asyncio.iscoroutine(result):
                    await result
        exec(format_line, namespace)

    asyncio.run(run())
    return namespace["search_results_str"]


def search_r1_request(url: str, payload: dict) -> dict:
    """Search-R1's ``retrieval_request.py`` script (``requests.post`` of ``{"queries", "topk", "return_scores":
    true}``, ``raise_for_status``, prints the body); its URL and the ``payload`` literal are set at call time."""
    source = (CLIENTS_DIR / "search_r1" / "retrieval_request.py").read_text(encoding="utf-8")
    source = source.replace('"http://127.0.0.1:8000/retrieve"', repr(f"{url}/retrieve"))
    tree = ast.parse(source)
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "payload":
            node.value = ast.Name("PAYLOAD", ast.Load())
    namespace = {"PAYLOAD": payload}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(ast.fix_missing_locations(tree), "retrieval_request.py", "exec"), namespace)
    assert out.getvalue().startswith("Response from server:")
    return namespace["retrieved_data"]


@contextlib.contextmanager
def _environ(values: dict):
    import os

    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ----------------------------------------------------------------------------------------------- the table
CASES = ("normal", "empty", "non-ASCII", "long query", "topk 10")

CLIENTS = [
    # (name, file, what it sends, what it reads)
    ("SkyRL-gym 0.4.0", "`skyrl_gym/tools/search.py` (`SearchToolGroup`)",
     '`{"query": "q", "topk", "return_scores": true}`', "`result[i][j].document.contents`"),
    ("skyrl-agent", "`skyrl_agent/tools/local_search.py`",
     '`{"queries": ["q"], "topk", "return_scores": true}`', "`result[0][j].document.contents`"),
    ("rLLM", "`examples/fully_async/deepresearch/tool.py`",
     '`{"query": "q", "top_k": k}`', "`results[j].id / score / content.contents`"),
    ("ASearcher", "`utils/search_utils.py` (`AsyncSearchBrowserClient`)",
     '`{"queries", "topk", "return_scores": false}`; `POST /access {"urls"}`',
     "`result[i][j].contents / url`; `result[i].contents`"),
    ("AReaL notebook", "`examples/notebook/asearcher.ipynb` (`call_search_tool`)",
     '`{"queries", "topk", "return_scores": false}`', "`result[i][j].wikipedia_title / contents`"),
    ("Search-R1", "`search_r1/search/retrieval_request.py`",
     '`{"queries", "topk", "return_scores": true}`', "`result` (printed)"),
]

BEGIN, END = "<!-- client-compat-table:begin -->", "<!-- client-compat-table:end -->"


def render_table() -> str:
    lines = [BEGIN, "", "| client (its own code, run unchanged) | sends | reads | " + " | ".join(CASES) + " |",
             "|---|---|---|" + "---|" * len(CASES)]
    for name, path, sends, reads in CLIENTS:
        lines.append(f"| {name} {path} | {sends} | {reads} | " + " | ".join("works" for _ in CASES) + " |")
    lines += ["", END]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- the tests
def _titles_in(text: str) -> list[str]:
    return [title for _, title, _ in PAGES if title in text]


def test_skyrl_gym(server):
    url = server.url
    normal = skyrl_gym_search(url, "what is the capital of France", 3)
    assert normal.startswith("Doc 1: \"Paris\"\n") and "Doc 3:" in normal and "Doc 4:" not in normal
    assert skyrl_gym_search(url, "", 3) in ("", "No search results found.")  # an empty query: no hits, no error
    assert skyrl_gym_search(url, NON_ASCII, 3).startswith('Doc 1: "Zürich"')
    assert skyrl_gym_search(url, LONG, 3).startswith('Doc 1: "Paris"')
    assert "Doc 10:" in skyrl_gym_search(url, "capital", 10)


def test_skyrl_agent(server):
    url = server.url
    normal = skyrl_agent_local_search(url, "what is the capital of France", 3)
    assert normal.startswith('Doc 1(Title: "Paris") Paris is the capital') and "Doc 3(" in normal
    empty = skyrl_agent_local_search(url, "", 3)
    assert empty in ("No search results found.",) or empty.startswith("Doc 1(")
    assert skyrl_agent_local_search(url, NON_ASCII, 3).startswith('Doc 1(Title: "Zürich")')
    assert skyrl_agent_local_search(url, LONG, 3).startswith('Doc 1(Title: "Paris")')
    topk10 = skyrl_agent_local_search(url, "capital", 10)
    assert "Doc 10(" in topk10 and "Doc 11(" not in topk10


def test_rllm(server):
    url = server.url
    normal = rllm_local_retrieval(url, "what is the capital of France", 3)
    assert normal.startswith('<result id="paris" score="') and "<title>Paris</title>" in normal
    assert normal.count("<result ") == 3
    empty = rllm_local_retrieval(url, "", 3)
    assert not empty.startswith("Error") and (empty.startswith("No relevant") or empty.startswith("<result"))
    assert "<title>Zürich</title>" in rllm_local_retrieval(url, NON_ASCII, 3).split("</result>")[0]
    assert rllm_local_retrieval(url, LONG, 3).startswith('<result id="paris"')
    assert rllm_local_retrieval(url, "capital", 10).count("<result ") == 10


def test_asearcher_search_and_access(server, tmp_path):
    url = server.url
    [normal] = asearcher_search(url, ["what is the capital of France"], 3, tmp_path)
    assert normal["documents"][0].startswith('"Paris"\nParis is the capital')
    assert normal["urls"][0] == "https://en.wikipedia.org/wiki/Paris" and len(normal["urls"]) == 3
    assert asearcher_search(url, [], 3, tmp_path) == []
    [accented, long] = asearcher_search(url, [NON_ASCII, LONG], 3, tmp_path)
    assert accented["urls"][0] == "https://en.wikipedia.org/wiki/Zürich" and long["urls"][0].endswith("/Paris")
    [many] = asearcher_search(url, ["capital"], 10, tmp_path)
    assert len(many["documents"]) == len(many["urls"]) == 10
    # its browsing tool: the whole page of a URL a search returned (both Paris passages), None -> "" if unknown
    pages = asearcher_access(url, [normal["urls"][0], "https://en.wikipedia.org/wiki/Nowhere"], tmp_path)
    assert pages[0]["page"] == '"Paris"\n' + PAGES[0][2] + "\n" + PAGES[1][2]
    assert pages[1]["page"] == ""
    # ASearcher's own server reads ".../index.php/Title" as ".../index.php?title=Title"; so does ours
    assert asearcher_access(url, ["https://en.wikipedia.org/w/index.php/Hamlet"], tmp_path)[0]["page"].startswith(
        '"Hamlet"')


def test_areal_notebook(server):
    url = server.url
    normal = areal_notebook_search(url, "what is the capital of France", 3)
    assert normal.startswith('\n\n<information>\n<p title="Paris">\n"Paris"\nParis is the capital')
    assert normal.count("<p title=") == 3
    empty = areal_notebook_search(url, "", 3)
    assert empty.startswith("\n\n<information>\n")
    assert '<p title="Zürich">' in areal_notebook_search(url, NON_ASCII, 3).split("</p>")[0]
    assert areal_notebook_search(url, LONG, 3).startswith('\n\n<information>\n<p title="Paris">')
    assert areal_notebook_search(url, "capital", 10).count("<p title=") == 10


def test_search_r1_request_script(server):
    url = server.url
    as_shipped = {"queries": ["What is the capital of France?", "Explain neural networks."] * 200, "topk": 5,
                  "return_scores": True}
    body = search_r1_request(url, as_shipped)
    assert len(body["result"]) == 400 and all(len(hits) == 5 for hits in body["result"][::2])  # France: 5 hits
    assert all(hits == [] for hits in body["result"][1::2])  # no passage of this corpus mentions neural networks
    assert body["result"][0][0]["document"]["id"] == "paris" and "score" in body["result"][0][0]
    assert search_r1_request(url, {"queries": [], "topk": 3, "return_scores": True}) == {"result": []}
    assert search_r1_request(url, {"queries": [NON_ASCII], "topk": 3})["result"][0][0]["id"] == "zurich"
    assert search_r1_request(url, {"queries": [LONG], "topk": 3})["result"][0][0]["id"] == "paris"
    assert len(search_r1_request(url, {"queries": ["capital"], "topk": 10})["result"][0]) == 10


def test_rows_come_back_as_stored_and_long_queries_are_counted(server):
    import httpx

    before = httpx.get(f"{server.url}/metrics").json()["truncated_queries"]
    response = httpx.post(f"{server.url}/retrieve", json={"queries": [LONG, "paris", LONG], "topk": 1})
    assert response.status_code == 200 and response.headers["x-truncated-queries"] == "2"
    assert httpx.get(f"{server.url}/metrics").json()["truncated_queries"] == before + 2
    row = response.json()["result"][1][0]
    assert row == {"id": "paris", "contents": f'"Paris"\n{PAGES[0][2]}',
                   "url": "https://en.wikipedia.org/wiki/Paris", "wikipedia_title": "Paris"}
    # the truncated query is answered as its first max_query_chars characters would be
    cut = httpx.post(f"{server.url}/retrieve", json={"queries": [LONG[:MAX_QUERY_CHARS]], "topk": 1}).json()
    assert response.json()["result"][0] == cut["result"][0]


def test_docs_table_is_current():
    text = DOCS.read_text(encoding="utf-8")
    assert BEGIN in text and END in text, f"{DOCS} lost its client-compat-table markers"
    current = text[text.index(BEGIN) : text.index(END) + len(END)]
    assert current == render_table(), "docs/retrieval.md's table is stale: python tests/retrieval/" \
                                      "test_client_compat.py --write"


if __name__ == "__main__" and "--write" in sys.argv:
    text = DOCS.read_text(encoding="utf-8")
    DOCS.write_text(text[: text.index(BEGIN)] + render_table() + text[text.index(END) + len(END) :], encoding="utf-8")
    print(f"wrote the table into {DOCS}")
