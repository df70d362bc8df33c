//! `GET /v1/openapi.json`: an OpenAPI 3.1 document made from the op table
//! at first request: per op its path, who may call it, its arguments (the
//! JSON Schema of the type its handler decodes), its result (protocol.md's
//! words for it) and its error codes with their statuses.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{json, Map, Value};

use super::{json as respond, status_of};
use crate::error::ErrorCode;
use crate::wire::{Access, Op, Role};

pub(super) async fn serve() -> Response {
    respond(StatusCode::OK, document())
}

/// The document (made once).
pub fn document() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(build)
}

fn build() -> Value {
    let mut settings = schemars::generate::SchemaSettings::draft2020_12();
    settings.definitions_path = "/components/schemas".into();
    let mut g = settings.into_generator();
    let results = results_in_protocol_md();
    let mut paths = Map::new();
    for &op in Op::ALL {
        let args = schemars::Schema::to_value(crate::wire::args::schema_of(op, &mut g));
        let who = who(op.access());
        let result = results.get(op.name()).cloned().unwrap_or_default();
        let mut responses = Map::new();
        responses.insert("200".into(), json!({"description": result, "content": {"application/json": {"schema": {}}}}));
        for (status, codes) in errors() {
            let description = codes.join(", ");
            let schema = json!({"allOf": [
                {"$ref": "#/components/schemas/Error"},
                {"properties": {"code": {"enum": codes}}}
            ]});
            responses.insert(
                status.to_string(),
                json!({"description": description, "content": {"application/json": {"schema": schema}}}),
            );
        }
        let security = if op.access() == Access::Anyone {
            json!([{}, {"bearer": []}, {"key": []}])
        } else {
            json!([{"bearer": []}, {"key": []}])
        };
        paths.insert(
            format!("/v1/{}", op.name()),
            json!({"post": {
                "operationId": op.name(),
                "summary": format!("{} ({who})", op.name()),
                "description": format!("Who may call it: {who}. The result: {result}. Every error changes nothing."),
                "requestBody": {"required": false, "content": {"application/json": {"schema": args}}},
                "responses": responses,
                "security": security,
            }}),
        );
    }
    for (path, what) in [
        ("/healthz", "200 while the process serves"),
        ("/readyz", "200 when the journal can commit, else 503 unavailable"),
    ] {
        paths.insert(
            path.into(),
            json!({"get": {
                "operationId": path.trim_start_matches('/'),
                "summary": what,
                "security": [{}],
                "responses": {
                    "200": {"description": "ready", "content": {"application/json": {"schema": {"type": "object", "properties": {"status": {"const": "ok"}}, "required": ["status"]}}}},
                    "503": {"description": "unavailable", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
                }
            }}),
        );
    }
    let mut schemas = g.take_definitions(true);
    let codes: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    schemas.insert(
        "Error".into(),
        json!({
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"enum": codes},
                "message": {"type": "string"},
                "item": {"type": "integer", "minimum": 0, "description": "the failing item of an atomic transfer_batch"}
            }
        }),
    );
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Tally",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "A ledger server for points, coins and tokens. Every op of the TCP protocol (protocol.md) as POST /v1/{op} with its arguments as a JSON object. Integers are exact over the whole i64 range."
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "a token from login, or a service key's secret"},
                "key": {"type": "apiKey", "in": "header", "name": "X-Tally-Key"}
            }
        }
    })
}

fn who(access: Access) -> String {
    if access == Access::Anyone {
        return "anyone".into();
    }
    let roles: Vec<&str> = Role::ALL.iter().filter(|r| access.allows(Some(**r))).map(|r| r.as_str()).collect();
    roles.join(", ")
}

/// The error codes an op may answer, by status: every code. Any op can
/// meet a bad request, a busy or failing server or a refused credential,
/// and money ops add their own; listing every code keeps the document
/// honest without a second table of which op raises which.
fn errors() -> BTreeMap<u16, Vec<&'static str>> {
    let mut by_status: BTreeMap<u16, Vec<&'static str>> = BTreeMap::new();
    for code in ErrorCode::ALL {
        by_status.entry(status_of(code).as_u16()).or_default().push(code.as_str());
    }
    by_status
}

/// protocol.md's "result" column of the ops table, by op name.
fn results_in_protocol_md() -> BTreeMap<&'static str, String> {
    let doc = include_str!("../../protocol.md");
    let mut out = BTreeMap::new();
    let Some(table) = doc.split("## Operations").nth(1) else {
        return out;
    };
    for line in table.lines().take_while(|l| !l.starts_with("## ")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() >= 5 {
            if let Some(name) = cells[1].strip_prefix('`').and_then(|c| c.strip_suffix('`')) {
                out.insert(name, cells[4].to_owned());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_is_documented_with_its_arguments_and_result() {
        let doc = document();
        assert_eq!(doc["openapi"], "3.1.0");
        for op in Op::ALL {
            let post = &doc["paths"][format!("/v1/{}", op.name())]["post"];
            assert_eq!(post["operationId"], op.name());
            let args = &post["requestBody"]["content"]["application/json"]["schema"]["$ref"];
            let name = args.as_str().and_then(|r| r.strip_prefix("#/components/schemas/")).expect("a $ref");
            assert!(doc["components"]["schemas"][name].is_object(), "{name}");
            let result = post["responses"]["200"]["description"].as_str().unwrap();
            assert!(!result.is_empty(), "protocol.md gives no result for {}", op.name());
        }
        let transfer = &doc["components"]["schemas"]["TransferArgs"];
        assert_eq!(transfer["additionalProperties"], false);
        assert_eq!(transfer["required"], json!(["to", "amount"]));
        assert_eq!(transfer["properties"]["amount"]["format"], "int64");
    }
}
