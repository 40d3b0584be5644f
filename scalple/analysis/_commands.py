"""Command tags and pgAudit statement classes for raw parse trees.

``command_tag`` mirrors PostgreSQL's ``CreateCommandTag()`` (src/backend/tcop/
utility.c) for raw parse trees; that is the tag pgAudit logs and, with two
exceptions, the word(s) the server puts in CommandComplete: ``SELECT INTO`` and
``CREATE TABLE AS`` complete as ``SELECT n`` on the wire.

``log_level`` mirrors ``GetCommandLogLevel()`` (``mod``/``ddl``/``all``) and
``pgaudit_class`` applies pgAudit's classification on top of it (pgaudit.c,
``log_audit_event``).  The analyser adjusts the class in a few documented cases
(see :mod:`scalple.analysis.sql`).

Parse trees are pglast's JSON form: ``{"NodeType": {field: value}}``.
"""

from __future__ import annotations

from typing import Any, Final

__all__ = ["command_tag", "log_level", "pgaudit_class"]

Node = dict[str, Any]

# OBJECT_* -> the noun used in ALTER/DROP tags (AlterObjectTypeCommandTag).
_OBJECT_NOUNS: Final = {
    "OBJECT_ACCESS_METHOD": "ACCESS METHOD",
    "OBJECT_AGGREGATE": "AGGREGATE",
    "OBJECT_ATTRIBUTE": "TYPE",
    "OBJECT_CAST": "CAST",
    "OBJECT_COLLATION": "COLLATION",
    "OBJECT_COLUMN": "TABLE",
    "OBJECT_CONVERSION": "CONVERSION",
    "OBJECT_DATABASE": "DATABASE",
    "OBJECT_DOMAIN": "DOMAIN",
    "OBJECT_DOMCONSTRAINT": "DOMAIN",
    "OBJECT_EVENT_TRIGGER": "EVENT TRIGGER",
    "OBJECT_EXTENSION": "EXTENSION",
    "OBJECT_FDW": "FOREIGN DATA WRAPPER",
    "OBJECT_FOREIGN_SERVER": "SERVER",
    "OBJECT_FOREIGN_TABLE": "FOREIGN TABLE",
    "OBJECT_FUNCTION": "FUNCTION",
    "OBJECT_INDEX": "INDEX",
    "OBJECT_LANGUAGE": "LANGUAGE",
    "OBJECT_LARGEOBJECT": "LARGE OBJECT",
    "OBJECT_MATVIEW": "MATERIALIZED VIEW",
    "OBJECT_OPCLASS": "OPERATOR CLASS",
    "OBJECT_OPERATOR": "OPERATOR",
    "OBJECT_OPFAMILY": "OPERATOR FAMILY",
    "OBJECT_POLICY": "POLICY",
    "OBJECT_PROCEDURE": "PROCEDURE",
    "OBJECT_PUBLICATION": "PUBLICATION",
    "OBJECT_ROLE": "ROLE",
    "OBJECT_ROUTINE": "ROUTINE",
    "OBJECT_RULE": "RULE",
    "OBJECT_SCHEMA": "SCHEMA",
    "OBJECT_SEQUENCE": "SEQUENCE",
    "OBJECT_STATISTIC_EXT": "STATISTICS",
    "OBJECT_SUBSCRIPTION": "SUBSCRIPTION",
    "OBJECT_TABCONSTRAINT": "TABLE",
    "OBJECT_TABLE": "TABLE",
    "OBJECT_TABLESPACE": "TABLESPACE",
    "OBJECT_TRANSFORM": "TRANSFORM",
    "OBJECT_TRIGGER": "TRIGGER",
    "OBJECT_TSCONFIGURATION": "TEXT SEARCH CONFIGURATION",
    "OBJECT_TSDICTIONARY": "TEXT SEARCH DICTIONARY",
    "OBJECT_TSPARSER": "TEXT SEARCH PARSER",
    "OBJECT_TSTEMPLATE": "TEXT SEARCH TEMPLATE",
    "OBJECT_TYPE": "TYPE",
    "OBJECT_VIEW": "VIEW",
}

# Node types whose tag does not depend on their fields.
_FIXED_TAGS: Final = {
    "InsertStmt": "INSERT",
    "DeleteStmt": "DELETE",
    "UpdateStmt": "UPDATE",
    "MergeStmt": "MERGE",
    "PLAssignStmt": "SELECT",
    "DeclareCursorStmt": "DECLARE CURSOR",
    "CreateDomainStmt": "CREATE DOMAIN",
    "CreateSchemaStmt": "CREATE SCHEMA",
    "CreateStmt": "CREATE TABLE",
    "CreateTableSpaceStmt": "CREATE TABLESPACE",
    "DropTableSpaceStmt": "DROP TABLESPACE",
    "AlterTableSpaceOptionsStmt": "ALTER TABLESPACE",
    "CreateExtensionStmt": "CREATE EXTENSION",
    "AlterExtensionStmt": "ALTER EXTENSION",
    "AlterExtensionContentsStmt": "ALTER EXTENSION",
    "CreateFdwStmt": "CREATE FOREIGN DATA WRAPPER",
    "AlterFdwStmt": "ALTER FOREIGN DATA WRAPPER",
    "CreateForeignServerStmt": "CREATE SERVER",
    "AlterForeignServerStmt": "ALTER SERVER",
    "CreateUserMappingStmt": "CREATE USER MAPPING",
    "AlterUserMappingStmt": "ALTER USER MAPPING",
    "DropUserMappingStmt": "DROP USER MAPPING",
    "CreateForeignTableStmt": "CREATE FOREIGN TABLE",
    "ImportForeignSchemaStmt": "IMPORT FOREIGN SCHEMA",
    "TruncateStmt": "TRUNCATE TABLE",
    "CommentStmt": "COMMENT",
    "SecLabelStmt": "SECURITY LABEL",
    "CopyStmt": "COPY",
    "AlterDomainStmt": "ALTER DOMAIN",
    "AlterDefaultPrivilegesStmt": "ALTER DEFAULT PRIVILEGES",
    "CompositeTypeStmt": "CREATE TYPE",
    "CreateEnumStmt": "CREATE TYPE",
    "CreateRangeStmt": "CREATE TYPE",
    "AlterEnumStmt": "ALTER TYPE",
    "ViewStmt": "CREATE VIEW",
    "IndexStmt": "CREATE INDEX",
    "RuleStmt": "CREATE RULE",
    "CreateSeqStmt": "CREATE SEQUENCE",
    "AlterSeqStmt": "ALTER SEQUENCE",
    "DoStmt": "DO",
    "CreatedbStmt": "CREATE DATABASE",
    "AlterDatabaseStmt": "ALTER DATABASE",
    "AlterDatabaseRefreshCollStmt": "ALTER DATABASE",
    "AlterDatabaseSetStmt": "ALTER DATABASE",
    "DropdbStmt": "DROP DATABASE",
    "NotifyStmt": "NOTIFY",
    "ListenStmt": "LISTEN",
    "UnlistenStmt": "UNLISTEN",
    "LoadStmt": "LOAD",
    "CallStmt": "CALL",
    "ClusterStmt": "CLUSTER",
    "ExplainStmt": "EXPLAIN",
    "RefreshMatViewStmt": "REFRESH MATERIALIZED VIEW",
    "AlterSystemStmt": "ALTER SYSTEM",
    "VariableShowStmt": "SHOW",
    "CreateTransformStmt": "CREATE TRANSFORM",
    "CreateTrigStmt": "CREATE TRIGGER",
    "CreateEventTrigStmt": "CREATE EVENT TRIGGER",
    "AlterEventTrigStmt": "ALTER EVENT TRIGGER",
    "CreatePLangStmt": "CREATE LANGUAGE",
    "CreateRoleStmt": "CREATE ROLE",
    "AlterRoleStmt": "ALTER ROLE",
    "AlterRoleSetStmt": "ALTER ROLE",
    "DropRoleStmt": "DROP ROLE",
    "DropOwnedStmt": "DROP OWNED",
    "ReassignOwnedStmt": "REASSIGN OWNED",
    "LockStmt": "LOCK TABLE",
    "ConstraintsSetStmt": "SET CONSTRAINTS",
    "CheckPointStmt": "CHECKPOINT",
    "ReindexStmt": "REINDEX",
    "CreateConversionStmt": "CREATE CONVERSION",
    "CreateCastStmt": "CREATE CAST",
    "CreateOpClassStmt": "CREATE OPERATOR CLASS",
    "CreateOpFamilyStmt": "CREATE OPERATOR FAMILY",
    "AlterOpFamilyStmt": "ALTER OPERATOR FAMILY",
    "AlterOperatorStmt": "ALTER OPERATOR",
    "AlterTypeStmt": "ALTER TYPE",
    "AlterTSDictionaryStmt": "ALTER TEXT SEARCH DICTIONARY",
    "AlterTSConfigurationStmt": "ALTER TEXT SEARCH CONFIGURATION",
    "CreatePolicyStmt": "CREATE POLICY",
    "AlterPolicyStmt": "ALTER POLICY",
    "CreateAmStmt": "CREATE ACCESS METHOD",
    "CreatePublicationStmt": "CREATE PUBLICATION",
    "AlterPublicationStmt": "ALTER PUBLICATION",
    "CreateSubscriptionStmt": "CREATE SUBSCRIPTION",
    "AlterSubscriptionStmt": "ALTER SUBSCRIPTION",
    "DropSubscriptionStmt": "DROP SUBSCRIPTION",
    "AlterCollationStmt": "ALTER COLLATION",
    "PrepareStmt": "PREPARE",
    "ExecuteStmt": "EXECUTE",
    "CreateStatsStmt": "CREATE STATISTICS",
    "AlterStatsStmt": "ALTER STATISTICS",
}

_TRANSACTION_TAGS: Final = {
    "TRANS_STMT_BEGIN": "BEGIN",
    "TRANS_STMT_START": "START TRANSACTION",
    "TRANS_STMT_COMMIT": "COMMIT",
    "TRANS_STMT_ROLLBACK": "ROLLBACK",
    "TRANS_STMT_ROLLBACK_TO": "ROLLBACK",
    "TRANS_STMT_SAVEPOINT": "SAVEPOINT",
    "TRANS_STMT_RELEASE": "RELEASE",
    "TRANS_STMT_PREPARE": "PREPARE TRANSACTION",
    "TRANS_STMT_COMMIT_PREPARED": "COMMIT PREPARED",
    "TRANS_STMT_ROLLBACK_PREPARED": "ROLLBACK PREPARED",
}

_DEFINE_TAGS: Final = {
    "OBJECT_AGGREGATE": "CREATE AGGREGATE",
    "OBJECT_OPERATOR": "CREATE OPERATOR",
    "OBJECT_TYPE": "CREATE TYPE",
    "OBJECT_TSPARSER": "CREATE TEXT SEARCH PARSER",
    "OBJECT_TSDICTIONARY": "CREATE TEXT SEARCH DICTIONARY",
    "OBJECT_TSTEMPLATE": "CREATE TEXT SEARCH TEMPLATE",
    "OBJECT_TSCONFIGURATION": "CREATE TEXT SEARCH CONFIGURATION",
    "OBJECT_COLLATION": "CREATE COLLATION",
    "OBJECT_ACCESS_METHOD": "CREATE ACCESS METHOD",
}

_DISCARD_TAGS: Final = {
    "DISCARD_ALL": "DISCARD ALL",
    "DISCARD_PLANS": "DISCARD PLANS",
    "DISCARD_TEMP": "DISCARD TEMP",
    "DISCARD_SEQUENCES": "DISCARD SEQUENCES",
}


def _alter(objtype: str | None) -> str:
    noun = _OBJECT_NOUNS.get(objtype or "")
    return f"ALTER {noun}" if noun else "UNKNOWN"


def command_tag(node_type: str, body: Node) -> str:
    """``CreateCommandTag()`` for one raw statement node."""
    fixed = _FIXED_TAGS.get(node_type)
    if fixed is not None:
        return fixed
    if node_type == "SelectStmt":
        return "SELECT INTO" if body.get("intoClause") else "SELECT"
    if node_type == "TransactionStmt":
        return _TRANSACTION_TAGS.get(body.get("kind", ""), "UNKNOWN")
    if node_type == "ClosePortalStmt":
        return "CLOSE CURSOR" if body.get("portalname") else "CLOSE CURSOR ALL"
    if node_type == "FetchStmt":
        return "MOVE" if body.get("ismove") else "FETCH"
    if node_type == "DropStmt":
        noun = _OBJECT_NOUNS.get(body.get("removeType", ""))
        if body.get("removeType") in ("OBJECT_COLUMN", "OBJECT_TABCONSTRAINT", "OBJECT_ATTRIBUTE"):
            noun = None
        return f"DROP {noun}" if noun else "UNKNOWN"
    if node_type == "RenameStmt":
        rtype = body.get("renameType")
        if rtype == "OBJECT_COLUMN":
            rtype = body.get("relationType")
        return _alter(rtype)
    if node_type in ("AlterObjectDependsStmt", "AlterObjectSchemaStmt", "AlterOwnerStmt"):
        return _alter(body.get("objectType"))
    if node_type in ("AlterTableMoveAllStmt", "AlterTableStmt"):
        return _alter(body.get("objtype"))
    if node_type == "AlterFunctionStmt":
        return _alter(body.get("objtype"))
    if node_type == "GrantStmt":
        return "GRANT" if body.get("is_grant") else "REVOKE"
    if node_type == "GrantRoleStmt":
        return "GRANT ROLE" if body.get("is_grant") else "REVOKE ROLE"
    if node_type == "DefineStmt":
        return _DEFINE_TAGS.get(body.get("kind", ""), "UNKNOWN")
    if node_type == "CreateFunctionStmt":
        return "CREATE PROCEDURE" if body.get("is_procedure") else "CREATE FUNCTION"
    if node_type == "VacuumStmt":
        return "VACUUM" if body.get("is_vacuumcmd") else "ANALYZE"
    if node_type == "CreateTableAsStmt":
        if body.get("objtype") == "OBJECT_MATVIEW":
            return "CREATE MATERIALIZED VIEW"
        return "SELECT INTO" if body.get("is_select_into") else "CREATE TABLE AS"
    if node_type == "VariableSetStmt":
        kind = body.get("kind", "")
        return "RESET" if kind in ("VAR_RESET", "VAR_RESET_ALL") else "SET"
    if node_type == "DiscardStmt":
        return _DISCARD_TAGS.get(body.get("target", ""), "UNKNOWN")
    if node_type == "DeallocateStmt":
        return "DEALLOCATE" if body.get("name") else "DEALLOCATE ALL"
    return "UNKNOWN"


_MOD: Final = frozenset({"InsertStmt", "DeleteStmt", "UpdateStmt", "MergeStmt", "TruncateStmt"})
_ALL: Final = frozenset(
    {
        "PLAssignStmt",
        "TransactionStmt",
        "DeclareCursorStmt",
        "ClosePortalStmt",
        "FetchStmt",
        "DeallocateStmt",
        "DoStmt",
        "NotifyStmt",
        "ListenStmt",
        "UnlistenStmt",
        "LoadStmt",
        "CallStmt",
        "VacuumStmt",
        "VariableSetStmt",
        "VariableShowStmt",
        "DiscardStmt",
        "LockStmt",
        "ConstraintsSetStmt",
        "CheckPointStmt",
        "ReindexStmt",
        "ExecuteStmt",
    }
)


def explain_analyzes(body: Node) -> bool:
    """Whether an ExplainStmt executes its statement (the last ANALYZE option wins)."""
    result = False
    for opt in body.get("options") or ():
        elem = opt.get("DefElem", {})
        if elem.get("defname") != "analyze":
            continue
        result = _def_boolean(elem.get("arg"))
    return result


def _def_boolean(arg: Node | None) -> bool:
    """``defGetBoolean``: no argument means true; on/off/true/false/1/0."""
    if arg is None:
        return True
    if "Boolean" in arg:
        return bool(arg["Boolean"].get("boolval", False))
    if "Integer" in arg:
        return bool(arg["Integer"].get("ival", 0))
    if "String" in arg:
        return str(arg["String"].get("sval", "")).lower() in ("true", "on", "yes", "1", "t", "y")
    if "A_Const" in arg:
        const = arg["A_Const"]
        if "boolval" in const:
            return bool(const["boolval"].get("boolval", False))
        if "ival" in const:
            return bool(const["ival"].get("ival", 0))
        if "sval" in const:
            return str(const["sval"].get("sval", "")).lower() in ("true", "on", "yes", "1")
    return True


def log_level(node_type: str, body: Node) -> str:
    """``GetCommandLogLevel()``: ``mod``, ``ddl`` or ``all``."""
    if node_type in _MOD:
        return "mod"
    if node_type == "SelectStmt":
        return "ddl" if body.get("intoClause") else "all"
    if node_type == "CopyStmt":
        return "mod" if body.get("is_from") else "all"
    if node_type == "PrepareStmt":
        inner = body.get("query") or {}
        for inner_type, inner_body in inner.items():
            return log_level(inner_type, inner_body)
        return "all"
    if node_type == "ExplainStmt":
        if explain_analyzes(body):
            for inner_type, inner_body in (body.get("query") or {}).items():
                return log_level(inner_type, inner_body)
        return "all"
    if node_type in _ALL:
        return "all"
    return "ddl"


_ROLE_NODES: Final = frozenset(
    {
        "CreateRoleStmt",
        "AlterRoleStmt",
        "CreateUserMappingStmt",
        "AlterUserMappingStmt",
        "GrantStmt",
        "GrantRoleStmt",
        "DropRoleStmt",
        "AlterRoleSetStmt",
        "AlterDefaultPrivilegesStmt",
    }
)
_READ_NODES: Final = frozenset({"CopyStmt", "DeclareCursorStmt", "SelectStmt", "PrepareStmt"})


def pgaudit_class(node_type: str, body: Node) -> str:
    """pgAudit's class for the statement: READ, WRITE, DDL, ROLE, FUNCTION or MISC."""
    level = log_level(node_type, body)
    if level == "mod":
        return "MISC" if node_type == "ExecuteStmt" else "WRITE"
    if level == "ddl":
        if node_type in _ROLE_NODES:
            return "ROLE"
        if node_type == "RenameStmt" and body.get("renameType") == "OBJECT_ROLE":
            return "ROLE"
        return "DDL"
    if node_type in _READ_NODES:
        return "READ"
    if node_type == "DoStmt":
        return "FUNCTION"
    return "MISC"
