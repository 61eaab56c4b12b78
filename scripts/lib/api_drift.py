"""API-drift check: every use of the generated Herald binding in a sample exists in it.

Usage:
    python api_drift.py swift  bindings/generated/swift/Herald.swift  SAMPLE.swift...
    python api_drift.py kotlin API.json[,API2.json]                   SAMPLE.kt...

The Swift binding's declarations (types, members with argument labels and defaults,
enum cases, record field types, protocol requirements, free functions) are read from
the generated file with tree-sitter-swift. tree-sitter-kotlin cannot parse all of the
generated Kotlin, so the Kotlin API comes from KotlinApiDump.kt (reflection over the
compiled binding) as JSON. In the samples, parsed with tree-sitter, it checks without
a compiler:

  - `T(...)`, `T.member`, `T.Nested(...)` where T is a binding type: the constructor's
    argument labels (Swift) / named and positional arguments (Kotlin), the member, the
    enum case or nested class;
  - `x.member`, `x.member(...)`, `x.field.member` where `x` has a binding type: a
    parameter `x: T`, `let x: T`, `let x = T(...)`, `guard let x = y` with y typed
    (Swift); in Kotlin resolved through the enclosing scopes (parameters, lambda, catch
    and for variables, `when (x) { is T.C -> }` smart casts, extension receivers,
    `val r = x.method()` via the method's return type);
  - `switch x { case .c }` (Swift) and `catch T.c`: the cases exist;
  - a class adopting a binding protocol / interface implements every requirement (with
    the same labels in Swift) and overrides nothing the binding does not declare;
  - calls of the binding's free functions: the labels / arguments.

Swift receivers are resolved by name per file (then across files); a name declared in
one Swift file with a binding type and another type is reported as ambiguous (rename
one). Uses whose receiver type it cannot tell are not checked; the per-file counts it
prints show what was. Exits 1 on any problem.
"""
import sys

from tree_sitter import Language, Parser


def text(node):
    # Kotlin names may be quoted (UniFFI writes fun `connect`()).
    return node.text.decode("utf-8").replace("`", "")


def walk(node):
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        stack.extend(reversed(n.children))


def child_of_type(node, *types):
    for c in node.children:
        if c.type in types:
            return c
    return None


class Api:
    """The binding: type name -> Type; free function name -> [signature]."""

    def __init__(self):
        self.types = {}
        self.functions = {}

    def type(self, name):
        return self.types.setdefault(name, Type(name))


class Type:
    def __init__(self, name):
        self.name = name
        self.kind = None  # class, struct, enum, protocol, interface, object
        self.members = {}  # name -> [signature] (None for a property / case)
        self.inits = []  # [signature]
        self.cases = set()
        self.requirements = {}  # protocol / interface methods: name -> signature
        self.member_types = {}  # property name -> type name (Swift records)

    def add_member(self, name, signature=None):
        self.members.setdefault(name, [])
        if signature is not None and signature not in self.members[name]:
            self.members[name].append(signature)


# A signature is a list of (label, has_default); label None means unlabeled (`_`).


def fits(signature, labels):
    """True when call labels (Swift) fit a declared signature, defaults omitted."""
    i = 0
    for label, has_default in signature:
        if i < len(labels) and labels[i] == label:
            i += 1
        elif not has_default:
            return False
    return i == len(labels)


def fits_named(signature, positional, named):
    """Kotlin: `positional` leading arguments, then named ones."""
    names = [label for label, _ in signature]
    if positional > len(names):
        return False
    rest = names[positional:]
    if any(n not in rest for n in named):
        return False
    given = set(names[:positional]) | set(named)
    return all(has_default or label in given for label, has_default in signature)


def show(signature):
    return "(" + ", ".join(f"{label or '_'}:" + ("=" if d else "") for label, d in signature) + ")"


# --------------------------------------------------------------------------- Swift


def swift_signature(decl):
    """[(argument label or None for `_`, has a default)] of a func / init."""
    sig = []
    kids = list(decl.children)
    for pos, p in enumerate(kids):
        if p.type != "parameter":
            continue
        names = [c for c in p.children if c.type == "simple_identifier"]
        label = text(names[0]) if names else None
        # In this grammar `= default` follows the parameter node as its siblings.
        has_default = pos + 1 < len(kids) and kids[pos + 1].type == "="
        sig.append((None if label == "_" else label, has_default))
    return sig


def swift_is_public(decl):
    mods = child_of_type(decl, "modifiers")
    return mods is not None and ("public" in text(mods) or "open" in text(mods))


def swift_api(root):
    api = Api()
    for node in root.children:
        if node.type == "class_declaration":
            kind_node = node.child_by_field_name("declaration_kind")
            kind = text(kind_node) if kind_node is not None else "class"
            name_node = node.child_by_field_name("name")
            if name_node is None:
                continue
            tname = text(name_node).split("<")[0]
            if kind != "extension" and not swift_is_public(node):
                continue
            if kind == "extension" and tname not in api.types:
                continue
            t = api.type(tname)
            if kind != "extension":
                t.kind = kind
            body = node.child_by_field_name("body")
            if body is None:
                continue
            for m in body.children:
                swift_member(t, m)
                if m.type == "enum_entry":
                    for c in m.children:
                        if c.type == "simple_identifier":
                            t.cases.add(text(c))
                            t.add_member(text(c))
        elif node.type == "protocol_declaration" and swift_is_public(node):
            t = api.type(text(node.child_by_field_name("name")))
            t.kind = "protocol"
            body = node.child_by_field_name("body")
            for m in body.children:
                if m.type == "protocol_function_declaration":
                    fname = text(m.child_by_field_name("name"))
                    sig = swift_signature(m)
                    t.requirements[fname] = sig
                    t.add_member(fname, sig)
        elif node.type == "function_declaration" and swift_is_public(node):
            fname = text(node.child_by_field_name("name"))
            api.functions.setdefault(fname, []).append(swift_signature(node))
    return api


def swift_member(t, m):
    if not swift_is_public(m):
        return
    if m.type == "function_declaration":
        t.add_member(text(m.child_by_field_name("name")), swift_signature(m))
    elif m.type == "init_declaration":
        t.inits.append(swift_signature(m))
    elif m.type == "property_declaration":
        pattern = child_of_type(m, "pattern")
        ident = child_of_type(pattern, "simple_identifier") if pattern is not None else None
        if ident is not None:
            t.add_member(text(ident))
            annotation = child_of_type(m, "type_annotation")
            tname = swift_type_name(annotation.children[-1]) if annotation is not None else None
            if tname:
                t.member_types[text(ident)] = tname


def swift_type_name(type_node):
    """`HeraldClient`, `HeraldClient?`, `HeraldClient!` -> HeraldClient; else None."""
    if type_node is None:
        return None
    if type_node.type in ("optional_type", "implicitly_unwrapped_type"):
        type_node = type_node.children[0]
    if type_node.type == "user_type":
        parts = [text(c) for c in type_node.children if c.type == "type_identifier"]
        return parts[-1] if len(parts) == 1 else None
    return None


def swift_receiver(node):
    """The name a navigation target ends in: `x`, `self.x`, `x?`, `self.x!`."""
    if node.type == "simple_identifier":
        return text(node)
    if node.type == "navigation_expression":
        target = node.child_by_field_name("target")
        if target is not None and target.type == "self_expression":
            suffix = node.child_by_field_name("suffix")
            ident = child_of_type(suffix, "simple_identifier")
            return text(ident) if ident is not None else None
    return None


def swift_call_labels(call):
    suffix = child_of_type(call, "call_suffix")
    if suffix is None:
        return None
    args = child_of_type(suffix, "value_arguments")
    labels = []
    if args is not None:
        for a in args.children:
            if a.type == "value_argument":
                label = child_of_type(a, "value_argument_label")
                labels.append(text(label) if label is not None else None)
    return labels


def swift_check(api, files, parser):
    problems = []
    counts = {}
    trees = {path: parser.parse(open(path, "rb").read()) for path in files}

    # Names -> declared types, over all files (receivers are resolved by name).
    declared = {}

    def declare(name, tname, path):
        declared.setdefault(name, {}).setdefault(tname, set()).add(path)

    def value_type(value, path):
        if value is None:
            return None
        if value.type in ("try_expression", "await_expression"):
            value = value.child_by_field_name("expr") or value.children[-1]
        if value.type == "call_expression" and value.children[0].type == "simple_identifier":
            return text(value.children[0])
        name = swift_receiver(value)
        if name is None:
            return None
        local = {t for t, paths in declared.get(name, {}).items() if path in paths}
        types = local or set(declared.get(name, {}))
        return next(iter(types)) if len(types) == 1 else None

    for _ in range(2):  # twice, so `guard let c = x` sees x declared later in the file
        for path, tree in trees.items():
            for n in walk(tree.root_node):
                if n.type == "parameter":
                    idents = [c for c in n.children if c.type == "simple_identifier"]
                    tname = swift_type_name(n.children[-1])
                    if idents and tname:
                        declare(text(idents[-1]), tname, path)
                elif n.type in ("property_declaration", "if_statement", "guard_statement"):
                    bound = None
                    for c in n.children:
                        if c.type == "pattern":
                            ident = c.child_by_field_name("bound_identifier") or child_of_type(c, "simple_identifier")
                            bound = text(ident) if ident is not None else None
                        elif c.type == "simple_identifier" and n.type != "property_declaration" and bound is None:
                            bound = text(c)
                        elif c.type == "type_annotation" and bound:
                            tname = swift_type_name(c.child_by_field_name("name") or c.children[-1])
                            if tname:
                                declare(bound, tname, path)
                        elif bound and c.type not in ("=", "value_binding_pattern", "let", "var", ",", "type_annotation"):
                            tname = value_type(c, path)
                            if tname:
                                declare(bound, tname, path)
                            bound = None

    # Per file: name -> binding type; a name not declared in the file falls back to a
    # unique declaration elsewhere (e.g. a property used from another file).
    by_file = {}
    for name, types in declared.items():
        for tname, paths in types.items():
            for path in paths:
                by_file.setdefault(path, {}).setdefault(name, set()).add(tname)
    binding_names = {}
    global_names = {}
    for path, names in by_file.items():
        for name, types in names.items():
            in_api = [t for t in types if t in api.types]
            if in_api and len(types) > 1:
                problems.append(f"{path}: ambiguous name '{name}': declared as {sorted(types)}; "
                                "rename one so the check can resolve it")
            elif in_api:
                binding_names.setdefault(path, {})[name] = in_api[0]
                global_names.setdefault(name, set()).add(in_api[0])

    def resolve(path, name):
        if name in by_file.get(path, {}):
            return binding_names.get(path, {}).get(name)
        types = global_names.get(name, set())
        return next(iter(types)) if len(types) == 1 else None

    def chained_type(node, path):
        """`x.a`, `x.a?`, `x?.a!` with x typed: the binding type of member a (records)."""
        while node is not None and node.type in ("postfix_expression", "optional_chaining"):
            node = node.children[0]
        if node is None or node.type != "navigation_expression":
            return None, None
        target = node.child_by_field_name("target")
        suffix = node.child_by_field_name("suffix")
        ident = child_of_type(suffix, "simple_identifier") if suffix is not None else None
        if target is None or ident is None:
            return None, None
        name = swift_receiver(target)
        base = resolve(path, name) if name is not None else None
        shown = name
        if base is None:
            base, shown = chained_type(target, path)
        t = api.types.get(base) if base else None
        if t is None:
            return None, None
        member_type = t.member_types.get(text(ident))
        return (member_type, f"{shown}.{text(ident)}") if member_type in api.types else (None, None)

    def member_ok(t, member, labels, where, what):
        counts[where] = counts.get(where, 0) + 1
        if member not in t.members:
            problems.append(f"{where}: {what}: '{t.name}' has no member '{member}' in the generated binding")
            return
        sigs = [s for s in t.members[member] if s is not None]
        if labels is not None and sigs and not any(fits(s, labels) for s in sigs):
            problems.append(f"{where}: {what}: labels {labels} fit no signature of {t.name}.{member} "
                            f"{' or '.join(show(s) for s in sigs)}")

    for path, tree in trees.items():
        for n in walk(tree.root_node):
            where = f"{path}:{n.start_point[0] + 1}"
            if n.type == "call_expression" and n.children[0].type == "simple_identifier":
                callee = text(n.children[0])
                labels = swift_call_labels(n)
                if callee in api.types and api.types[callee].kind in ("class", "struct"):
                    counts[where] = counts.get(where, 0) + 1
                    if not any(fits(s, labels) for s in api.types[callee].inits):
                        problems.append(f"{where}: {callee}({', '.join((l or '_') + ':' for l in labels)}) fits no "
                                        f"initializer: {' or '.join(show(s) for s in api.types[callee].inits)}")
                elif callee in api.functions:
                    counts[where] = counts.get(where, 0) + 1
                    if not any(fits(s, labels) for s in api.functions[callee]):
                        problems.append(f"{where}: {callee}: labels {labels} fit no signature "
                                        f"{' or '.join(show(s) for s in api.functions[callee])}")
            elif n.type == "navigation_expression":
                target = n.child_by_field_name("target")
                suffix = n.child_by_field_name("suffix")
                ident = child_of_type(suffix, "simple_identifier") if suffix is not None else None
                if target is None or ident is None:
                    continue
                member = text(ident)
                call = n.parent if n.parent is not None and n.parent.type == "call_expression" and n.parent.children[0] == n else None
                labels = swift_call_labels(call) if call is not None else None
                if target.type in ("simple_identifier", "user_type") and text(target) in api.types:
                    t = api.types[text(target)]
                    if t.kind == "enum":
                        counts[where] = counts.get(where, 0) + 1
                        if member not in t.cases:
                            problems.append(f"{where}: {t.name}.{member}: no such case in the generated binding "
                                            f"(cases: {', '.join(sorted(t.cases))})")
                    else:
                        member_ok(t, member, labels, where, f"{t.name}.{member}")
                    continue
                name = swift_receiver(target)
                tname = resolve(path, name) if name is not None else None
                if tname is None:
                    tname, name = chained_type(target, path)
                if tname:
                    member_ok(api.types[tname], member, labels, where, f"{name}.{member}")
            elif n.type == "catch_block":
                pattern = n.child_by_field_name("error")
                if pattern is None:
                    continue
                ut = child_of_type(pattern, "user_type")
                case = child_of_type(pattern, "simple_identifier")
                t = api.types.get(text(ut)) if ut is not None else None
                if t is not None and case is not None:
                    counts[where] = counts.get(where, 0) + 1
                    if text(case) not in t.cases:
                        problems.append(f"{where}: catch {t.name}.{text(case)}: no such case in the generated "
                                        f"binding (cases: {', '.join(sorted(t.cases))})")
            elif n.type == "switch_statement":
                subject = n.child_by_field_name("expr")
                name = swift_receiver(subject) if subject is not None else None
                t = api.types.get(resolve(path, name)) if name is not None else None
                if t is None or t.kind != "enum":
                    continue
                for entry in n.children:
                    if entry.type != "switch_entry":
                        continue
                    for pat in walk(entry):
                        if pat.type == "pattern" and child_of_type(pat, ".") is not None:
                            case = child_of_type(pat, "simple_identifier")
                            counts[where] = counts.get(where, 0) + 1
                            if case is not None and text(case) not in t.cases:
                                problems.append(f"{path}:{pat.start_point[0] + 1}: case .{text(case)} of "
                                                f"'{name}: {t.name}' is not in the generated binding "
                                                f"(cases: {', '.join(sorted(t.cases))})")
            elif n.type == "class_declaration":
                adopted = [text(c).strip() for c in n.children if c.type == "inheritance_specifier"]
                body = n.child_by_field_name("body")
                if body is None:
                    continue
                methods = {}
                for m in body.children:
                    if m.type == "function_declaration":
                        methods.setdefault(text(m.child_by_field_name("name")), []).append(swift_signature(m))
                for proto in adopted:
                    t = api.types.get(proto)
                    if t is None or t.kind != "protocol":
                        continue
                    for req, sig in t.requirements.items():
                        counts[where] = counts.get(where, 0) + 1
                        labels = [label for label, _ in sig]
                        if not any([label for label, _ in s] == labels for s in methods.get(req, [])):
                            problems.append(f"{where}: {text(n.child_by_field_name('name'))} adopts {proto} but "
                                            f"does not implement {req}{show(sig)}")
    return problems, counts, {k: v for names in binding_names.values() for k, v in names.items()}


# --------------------------------------------------------------------------- Kotlin


def kt_modifiers(node):
    mods = child_of_type(node, "modifiers")
    return text(mods) if mods is not None else ""


def kt_name(node):
    ident = child_of_type(node, "identifier", "simple_identifier", "type_identifier")
    return text(ident) if ident is not None else None


def kotlin_api(paths):
    """The API JSON printed by scripts/lib/KotlinApiDump.kt (reflection over the
    compiled binding); several files (comma-separated) are merged."""
    import json

    data = {"types": {}, "functions": {}}
    for path in paths.split(","):
        part = json.load(open(path))
        data["types"].update(part["types"])
        data["functions"].update(part["functions"])
    api = Api()
    for name, d in data["types"].items():
        t = api.type(name)
        t.kind = d["kind"]
        for member, sigs in d["members"].items():
            t.add_member(member)
            for sig in sigs:
                t.members[member].append([tuple(p) for p in sig])
        t.inits = [[tuple(p) for p in sig] for sig in d["inits"]]
        t.cases = set(d["cases"]) - {"Companion"}
        t.member_types = d.get("member_types", {})
        for case in t.cases:  # enum constants, nested classes: `PushProvider.FCM`
            t.add_member(case)
        if t.kind == "interface":
            t.requirements = {m: (sigs[0] if sigs else []) for m, sigs in t.members.items()
                              if m not in ("equals", "hashCode", "toString", "Companion")}
    for name, sigs in data["functions"].items():
        api.functions[name] = [[tuple(p) for p in sig] for sig in sigs]
    return api


IDENT = ("identifier", "simple_identifier", "type_identifier")


def kt_user_type(node):
    """`HeraldClient`, `HeraldClient?`, `HeraldException.TokenProvider` -> dotted name."""
    if node is None:
        return None
    if node.type == "nullable_type":
        node = node.children[0]
    if node.type == "user_type":
        return ".".join(text(c) for c in node.children if c.type in IDENT)
    return None


def kt_call_args(call):
    """(number of positional arguments, [names of named arguments]) of a call."""
    positional, named = 0, []
    for part in call.children[1:]:
        if part.type == "value_arguments":
            for a in part.children:
                if a.type != "value_argument":
                    continue
                kids = [c.type for c in a.children]
                if "=" in kids and a.children[0].type in IDENT:
                    named.append(text(a.children[0]))
                else:
                    positional += 1
        elif part.type in ("annotated_lambda", "lambda_literal"):
            positional += 1
    # `f(a, b) { ... }` parses as call(call(f, (a, b)), lambda): the lambda is f's too.
    outer = call.parent
    if outer is not None and outer.type == "call_expression" and outer.children[0] == call:
        positional += sum(1 for c in outer.children[1:] if c.type in ("annotated_lambda", "lambda_literal"))
    return positional, named


# Kotlin standard-library functions callable on any receiver.
KT_ANY_MEMBERS = {"let", "also", "apply", "run", "takeIf", "takeUnless", "to", "toString", "equals",
                  "hashCode", "javaClass"}


def kt_navigation_parts(node):
    """`a.b.c`, `a?.b`, `this.a.b` -> ['a', 'b', 'c'] when made of plain names."""
    parts = []
    while node is not None and node.type == "navigation_expression":
        last = node.children[-1]
        if last.type not in IDENT:
            return None
        parts.append(text(last))
        node = node.children[0]
    if node is None:
        return None
    if node.type in IDENT:
        parts.append(text(node))
    elif node.type == "this_expression":
        pass
    else:
        return None
    return list(reversed(parts))


def kt_decl_type(node, api, resolve=None):
    """The binding type a declaration gives its name: `x: T`, `val x = T(...)`,
    `val x = y.method(...)` with y typed; else None."""
    tname = kt_user_type(child_of_type(node, "user_type", "nullable_type"))
    if node.type == "property_declaration":
        var = child_of_type(node, "variable_declaration")
        tname = kt_user_type(child_of_type(var, "user_type", "nullable_type")) if var is not None else None
        if tname is None:
            for c in node.children:
                if c.type == "call_expression":
                    callee = kt_navigation_parts(c.children[0]) if c.children[0].type == "navigation_expression" \
                        else [text(c.children[0])]
                    if callee and ".".join(callee) in api.types:
                        tname = ".".join(callee)
                    elif callee and len(callee) == 2 and resolve is not None:
                        receiver = api.types.get(resolve(c, callee[0]))
                        if receiver is not None:
                            tname = receiver.member_types.get(callee[1])
    return tname


def kt_declared_name(node):
    if node.type == "property_declaration":
        var = child_of_type(node, "variable_declaration")
        return kt_name(var) if var is not None else None
    return kt_name(node)


def kt_scope_lookup(node, name, api, resolve=None):
    """Resolves `name` at `node` by walking out through the enclosing scopes: smart casts
    (`when (x) { is T -> }`), lambda / catch / for / function parameters, declarations in
    enclosing blocks and class bodies. Returns (found, binding type or None)."""
    scope = node.parent
    while scope is not None:
        if scope.type == "when_entry":
            when = scope.parent
            subject = child_of_type(when, "when_subject") if when is not None else None
            cond = child_of_type(scope, "type_test")
            if subject is not None and cond is not None and text(subject).strip("() ") == name:
                return True, kt_user_type(child_of_type(cond, "user_type", "nullable_type"))
        candidates = []
        if scope.type == "catch_block" and kt_name(scope) == name:
            return True, kt_user_type(child_of_type(scope, "user_type", "nullable_type"))
        if scope.type == "for_statement":
            var = child_of_type(scope, "variable_declaration")
            if var is not None and kt_name(var) == name:
                return True, kt_user_type(child_of_type(var, "user_type", "nullable_type"))
        if scope.type == "function_declaration" and any(c.type == "." for c in scope.children):
            # Extension function on a binding type: its members are in scope as `this`.
            receiver = api.types.get(kt_user_type(child_of_type(scope, "user_type")))
            if receiver is not None and name in receiver.member_types:
                return True, receiver.member_types[name]
        if scope.type in ("function_declaration", "secondary_constructor"):
            params = child_of_type(scope, "function_value_parameters")
            candidates += [p for p in (params.children if params is not None else []) if p.type == "parameter"]
        if scope.type == "lambda_literal":
            params = child_of_type(scope, "lambda_parameters")
            candidates += [p for p in (params.children if params is not None else []) if p.type == "variable_declaration"]
            if name == "it" and params is None:
                return True, None
        if scope.type in ("block", "class_body", "source_file", "statements"):
            candidates += [c for c in scope.children if c.type == "property_declaration"]
        if scope.type == "class_declaration":
            ctor = child_of_type(scope, "primary_constructor")
            params = child_of_type(ctor, "class_parameters") if ctor is not None else None
            candidates += [p for p in (params.children if params is not None else []) if p.type == "class_parameter"]
        for decl in candidates:
            if kt_declared_name(decl) == name:
                return True, kt_decl_type(decl, api, resolve)
        scope = scope.parent
    return False, None


def kotlin_check(api, files, parser):
    problems = []
    counts = {}
    trees = {path: parser.parse(open(path, "rb").read()) for path in files}

    # Extension functions the sample declares on binding types count as their members.
    for tree in trees.values():
        for n in walk(tree.root_node):
            if n.type == "function_declaration" and any(c.type == "." for c in n.children):
                receiver = kt_user_type(child_of_type(n, "user_type"))
                if receiver in api.types:
                    api.types[receiver].add_member(kt_name(n))

    # Properties typed with a binding type, by name over all files, for receivers that
    # are not declared where they are used (e.g. a property of another class).
    global_names = {}
    for tree in trees.values():
        for n in walk(tree.root_node):
            if n.type in ("property_declaration", "class_parameter"):
                name, tname = kt_declared_name(n), kt_decl_type(n, api)
                if name and tname in api.types:
                    global_names.setdefault(name, set()).add(tname)
    resolved_names = {}

    def resolve(node, name):
        found, tname = kt_scope_lookup(node, name, api, resolve)
        if not found:
            types = global_names.get(name, set())
            tname = next(iter(types)) if len(types) == 1 else None
        if tname in api.types:
            resolved_names[name] = tname
            return tname
        return None

    def count(where):
        counts[where] = counts.get(where, 0) + 1

    def check_member(t, member, where, what, args=None):
        count(where)
        if member in KT_ANY_MEMBERS:
            return
        if member not in t.members:
            problems.append(f"{where}: {what}: '{t.name}' has no member '{member}' in the generated binding")
            return
        sigs = [sig for sig in t.members[member] if sig is not None]
        if args is not None and sigs and not any(fits_named(sig, *args) for sig in sigs):
            problems.append(f"{where}: {what}(...): arguments (positional {args[0]}, named {args[1]}) fit no "
                            f"signature {' or '.join(show(sig) for sig in sigs)}")

    def walk_members(node, parts, where, args):
        """`x.a.b(...)` with x typed: each member exists; follows record field types."""
        tname = resolve(node, parts[0])
        shown = parts[0]
        for i, member in enumerate(parts[1:], start=1):
            t = api.types.get(tname) if tname else None
            if t is None:
                return
            last = i == len(parts) - 1
            check_member(t, member, where, f"{shown}.{member}", args if last else None)
            tname = t.member_types.get(member)
            shown = f"{shown}.{member}"

    def check_type_path(parts, where, args=None):
        """['HeraldException', 'TokenProvider'], ['PushProvider', 'FCM'], ..."""
        for i in range(len(parts), 0, -1):
            base = ".".join(parts[:i])
            if base not in api.types:
                continue
            rest = parts[i:]
            if not rest:
                if args is not None and api.types[base].inits:
                    count(where)
                    if not any(fits_named(sig, *args) for sig in api.types[base].inits):
                        problems.append(f"{where}: {base}(...): arguments (positional {args[0]}, named {args[1]}) "
                                        f"fit no constructor {' or '.join(show(sig) for sig in api.types[base].inits)}")
                return
            t = api.types[base]
            nested = api.types.get(base + "." + rest[0])
            if nested is not None and len(rest) == 1:
                check_type_path(parts[: i + 1], where, args)
                count(where)
                return
            check_member(t, rest[0], where, f"{base}.{rest[0]}", args if len(rest) == 1 else None)
            return

    for path, tree in trees.items():
        for n in walk(tree.root_node):
            where = f"{path}:{n.start_point[0] + 1}"
            parent = n.parent
            if n.type == "call_expression":
                callee = n.children[0]
                args = kt_call_args(n)
                parts = kt_navigation_parts(callee) if callee.type == "navigation_expression" else (
                    [text(callee)] if callee.type in IDENT else None)
                if not parts:
                    continue
                if parts[0] in api.types:
                    check_type_path(parts, where, args)
                elif len(parts) == 1 and parts[0] in api.functions:
                    count(where)
                    if not any(fits_named(sig, *args) for sig in api.functions[parts[0]]):
                        problems.append(f"{where}: {parts[0]}(...) arguments fit no signature "
                                        f"{' or '.join(show(sig) for sig in api.functions[parts[0]])}")
                elif len(parts) >= 2:
                    walk_members(n, parts, where, args)
            elif n.type == "navigation_expression":
                if parent is not None and parent.type in ("call_expression", "navigation_expression") \
                        and parent.children[0] == n:
                    continue  # the callee or receiver of an outer expression: checked there
                parts = kt_navigation_parts(n)
                if not parts:
                    continue
                if parts[0] in api.types:
                    check_type_path(parts, where)
                    continue
                walk_members(n, parts, where, None)
            elif n.type == "user_type":
                parts = [text(c) for c in n.children if c.type in IDENT]
                if len(parts) > 1 and parts[0] in api.types:
                    check_type_path(parts, where)
            elif n.type in ("class_declaration", "object_literal", "object_declaration"):
                supers = []
                for spec in walk(n):
                    if spec.type == "delegation_specifier" and spec.parent.parent == n:
                        ut = child_of_type(spec, "user_type") or child_of_type(
                            child_of_type(spec, "constructor_invocation") or spec, "user_type")
                        if ut is not None:
                            supers.append(kt_user_type(ut))
                body = child_of_type(n, "class_body")
                overrides = {}
                for m in (body.children if body is not None else []):
                    if m.type == "function_declaration" and "override" in kt_modifiers(m):
                        overrides[kt_name(m)] = True
                for sup in supers:
                    t = api.types.get(sup)
                    if t is None or t.kind != "interface":
                        continue
                    for req, sig in t.requirements.items():
                        count(where)
                        if req not in overrides:
                            problems.append(f"{where}: implements {sup} but does not override {req}{show(sig)}")
                    for name in overrides:
                        if name not in t.members and name not in ("equals", "hashCode", "toString"):
                            problems.append(f"{where}: overrides {name}, which {sup} does not declare in the generated binding")
    return problems, counts, resolved_names


def main():
    lang_name, generated, files = sys.argv[1], sys.argv[2], sys.argv[3:]
    if lang_name == "swift":
        import tree_sitter_swift as grammar
    else:
        import tree_sitter_kotlin as grammar
    parser = Parser(Language(grammar.language()))
    if lang_name == "swift":
        api = swift_api(parser.parse(open(generated, "rb").read()).root_node)
    else:
        api = kotlin_api(generated)
    if lang_name == "swift":
        # Generated classes implement a `<Name>Protocol` with the same methods.
        for t in api.types.values():
            proto = api.types.get(t.name + "Protocol")
            if proto is not None and t.kind == "class":
                for name, sigs in proto.members.items():
                    for s in sigs or [None]:
                        t.add_member(name, s)
        problems, counts, names = swift_check(api, files, parser)
    else:
        problems, counts, names = kotlin_check(api, files, parser)
    print(f"binding {generated}: {len(api.types)} types, {len(api.functions)} free functions")
    if names:
        print("  names typed with binding types: " + ", ".join(f"{k}: {v}" for k, v in sorted(names.items())))
    per_file = {}
    for where, n in counts.items():
        path = where.rsplit(":", 1)[0]
        per_file[path] = per_file.get(path, 0) + n
    for path in files:
        print(f"  {path}: {per_file.get(path, 0)} binding uses checked")
    for p in problems:
        print("API DRIFT: " + p)
    if problems:
        print(f"FAILED: {len(problems)} use(s) of the binding that the generated {lang_name} binding does not have")
        sys.exit(1)
    print(f"API drift OK: {sum(counts.values())} binding uses in {len(files)} {lang_name} files match the generated binding")


if __name__ == "__main__":
    main()
