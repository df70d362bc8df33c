-- wrk script: POST /v1/transfer of 1 between two random accounts
-- acct0..acctN-1 (made by the load harness). Arguments after `--`: the
-- bearer token, then N (default 10000).
--   wrk -t2 -c64 -d10s -s benches/http_transfer.lua http://127.0.0.1:7780 -- TOKEN 10000
local token, accounts

function init(args)
  token = args[1]
  accounts = tonumber(args[2] or "10000")
  math.randomseed(os.time() + math.floor(os.clock() * 1e6))
end

function request()
  local a = math.random(0, accounts - 1)
  local b = (a + math.random(1, accounts - 1)) % accounts
  local body = string.format('{"from":"acct%d","to":"acct%d","amount":1}', a, b)
  return wrk.format("POST", "/v1/transfer", {
    ["Authorization"] = "Bearer " .. token,
    ["Content-Type"] = "application/json",
  }, body)
end
