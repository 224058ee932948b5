"""The Python reference client (mattsta/mpreg), unmodified in logic, against two Rust nodes.

Evidence for issue 13, not part of CI (it needs the reference's source and its Python
dependencies). To run it:

  1. a copy of the reference's `mpreg/` package (commit 4dc0027) in a directory D; it is
     written for Python 3.14, so on 3.13 rewrite `except A, B:` as `except (A, B):`
     (a syntax change only; 25 places);
  2. a Python 3.13 virtual environment with the reference's dependencies
     (pyproject.toml) plus hypothesis, psutil and networkx, which its modules import;
  3. node A: `mpreg server start --port 0 --name A --functions demo` (prints MPREG_URL),
     node B: `mpreg server start --port 0 --name B --functions tpu_square --peer <A's URL>`;
  4. `cd D && python smoke.py <A's URL> <B's URL>`: one `ok`/`FAIL` line per check, exit
     status 1 on any failure.
"""
import asyncio, sys, time
from loguru import logger
logger.remove(); logger.add(sys.stderr, level="WARNING")
from mpreg.client.client_api import MPREGClientAPI
from mpreg.client.cluster_client import MPREGClusterClient
from mpreg.core.model import MPREGException

A, B = sys.argv[1], sys.argv[2]
failures = []
def check(what, cond, detail=""):
    print(("ok   " if cond else "FAIL ") + what + (f"  [{detail}]" if detail else ""))
    if not cond: failures.append(what)

async def main():
    api = MPREGClientAPI(A, full_log=False)
    await api.connect()
    check("multiply(6, factor=7) == 42", await api.call("multiply", 6, factor=7) == 42)
    check("add(a=1, b=2) == 3", await api.call("add", a=1, b=2) == 3)
    check("echo(arg='v') == 'v'", await api.call("echo", arg="v") == "v")
    try:
        await api.call("multiply", 6, y=7); check("unknown keyword refused", False)
    except MPREGException as e:
        check("unknown keyword refused with 1003", e.rpc_error.code == 1003, e.rpc_error.details)
    peers = await api.list_peers()
    check("list_peers() on A lists B only", [p.url for p in peers] == [B], [p.url for p in peers])
    check("list_peers() B's funs include tpu_square", "tpu_square" in peers[0].funs, peers[0].funs)
    check("list_peers() B's locs", tuple(peers[0].locs) == ("tpu",), peers[0].locs)
    cmap = await api.cluster_map()
    urls = sorted(u for n in cmap.nodes for u in n.advertised_urls)
    check("cluster_map() lists both nodes", urls == sorted([A, B]), urls)
    v2 = await api.cluster_map_v2(limit=1)
    check("cluster_map_v2(limit=1) paginates", len(v2.nodes) == 1 and v2.next_page_token is not None, v2.next_page_token)
    q = await api.catalog_query(entry_type="functions", resources=("tpu",))
    check("catalog_query(functions, tpu)", [i["identity"]["name"] for i in q.items] == ["tpu_square"], q.items)
    w = await api.catalog_watch()
    check("catalog_watch() topic", w.topic == "mpreg.discovery.delta", w.topic)
    rl = await api.rpc_list(function_name="multiply")
    check("rpc_list(multiply)", len(rl.items) == 1 and rl.items[0].summary is not None, rl.items)
    rd = await api.rpc_describe(function_name="multiply")
    params = [p.name for p in rd.items[0].spec.parameters] if rd.items and rd.items[0].spec else None
    check("rpc_describe(multiply) parameters", params == ["x", "factor"], params)
    rd = await api.rpc_describe(function_name="tpu_square")
    params = [p.name for p in rd.items[0].spec.parameters] if rd.items and rd.items[0].spec else None
    check("rpc_describe(tpu_square) on A describes B's function", params == ["x"], params)
    rr = await api.rpc_report()
    check("rpc_report() counts", rr.total_functions > 0, rr.total_functions)
    sq = await api.summary_query()
    check("summary_query() items", any(s.service_id == "tpu_square" for s in sq.items), [s.service_id for s in sq.items])
    sw = await api.summary_watch()
    check("summary_watch() topic", sw.topic == "mpreg.discovery.summary", sw.topic)
    try:
        await api.dns_list(); check("dns_list refused", False)
    except MPREGException as e:
        check("dns_list refused: not supported", "not supported by this server" in str(e.rpc_error.details), e.rpc_error.details)
    t0 = time.perf_counter(); await api.disconnect(); dt = (time.perf_counter() - t0) * 1e3
    check("disconnect() returns (time reported, not asserted)", True, f"{dt:.1f} ms")

    cc = MPREGClusterClient(seed_urls=(A,), full_log=False)
    await cc.connect()
    m = await cc.cluster_map()
    check("MPREGClusterClient.cluster_map()", len(m.nodes) == 2, len(m.nodes))
    s = await cc.summary_query(include_ingress=True)
    check("MPREGClusterClient.summary_query(ingress)", bool(s.ingress), s.ingress)
    check("MPREGClusterClient.call(tpu_square, 7)", await cc.call("tpu_square", 7) == 49)
    t0 = time.perf_counter(); await cc.disconnect(); dt = (time.perf_counter() - t0) * 1e3
    check("MPREGClusterClient.disconnect()", True, f"{dt:.1f} ms")
    print("failures:", failures)
    return 1 if failures else 0

sys.exit(asyncio.run(main()))
