// Prints the public API of a compiled Kotlin package as JSON, for scripts/lib/api_drift.py
// (tree-sitter-kotlin cannot parse all of the UniFFI-generated Kotlin, reflection can).
// Usage: java -cp <jar>:kotlin-stdlib.jar:kotlin-reflect.jar KotlinApiDumpKt <jar> <package>
// Output: {"types": {"Name" or "Outer.Nested": {"kind", "members": {name: [signature]},
// "member_types": {property: type}, "inits": [signature], "cases": [...]}}, "functions": {name: [signature]}} where a
// signature is [[parameterName, hasDefault], ...].

import java.util.jar.JarFile
import kotlin.reflect.KClass
import kotlin.reflect.KFunction
import kotlin.reflect.KParameter
import kotlin.reflect.KProperty
import kotlin.reflect.KVisibility
import kotlin.reflect.jvm.kotlinFunction

fun q(s: String) = "\"" + s.replace("\\", "\\\\").replace("\"", "\\\"") + "\""

fun signature(f: KFunction<*>): String =
    f.parameters.filter { it.kind == KParameter.Kind.VALUE }
        .joinToString(",", "[", "]") { "[" + q(it.name ?: "_") + "," + it.isOptional + "]" }

fun describe(k: KClass<*>, name: String, pkg: String, out: MutableList<String>) {
    if (k.visibility != KVisibility.PUBLIC) return
    val kind = when {
        k.java.isEnum -> "enum"
        k.java.isInterface -> "interface"
        k.objectInstance != null || k.isCompanion -> "object"
        else -> "class"
    }
    val members = linkedMapOf<String, MutableList<String>>()
    val memberTypes = linkedMapOf<String, String>()
    for (m in k.members) {
        if (m.visibility != KVisibility.PUBLIC) continue
        val list = members.getOrPut(m.name) { mutableListOf() }
        if (m is KFunction<*> && m !is KProperty<*>) list.add(signature(m))
        // Types of fields and of what methods return, so the check can follow
        // `message.notification.title` and `val r = client.registerPushToken(...)`.
        val type = (m.returnType.classifier as? KClass<*>)?.qualifiedName
        if (type != null && type.startsWith("$pkg.")) memberTypes[m.name] = type.removePrefix("$pkg.")
    }
    val cases = mutableListOf<String>()
    if (k.java.isEnum) k.java.enumConstants.forEach { cases.add((it as Enum<*>).name) }
    for (n in k.nestedClasses) {
        val simple = n.simpleName ?: continue
        if (n.visibility != KVisibility.PUBLIC) continue
        cases.add(simple)
        members.getOrPut(simple) { mutableListOf() }
        describe(n, "$name.$simple", pkg, out)
    }
    val inits = k.constructors.filter { it.visibility == KVisibility.PUBLIC }.map { signature(it) }
    out.add(
        q(name) + ":{\"kind\":" + q(kind) +
            ",\"members\":{" + members.entries.joinToString(",") { q(it.key) + ":[" + it.value.joinToString(",") + "]" } + "}" +
            ",\"member_types\":{" + memberTypes.entries.joinToString(",") { q(it.key) + ":" + q(it.value) } + "}" +
            ",\"inits\":[" + inits.joinToString(",") + "]" +
            ",\"cases\":[" + cases.joinToString(",") { q(it) } + "]}",
    )
}

fun main(args: Array<String>) {
    val (jarPath, pkg) = args
    val prefix = pkg.replace('.', '/') + "/"
    val loader = Thread.currentThread().contextClassLoader
    val types = mutableListOf<String>()
    val functions = linkedMapOf<String, MutableList<String>>()
    JarFile(jarPath).use { jar ->
        for (entry in jar.entries().toList().map { it.name }.sorted()) {
            if (!entry.startsWith(prefix) || !entry.endsWith(".class")) continue
            val className = entry.removeSuffix(".class").replace('/', '.')
            if (className.substring(pkg.length + 1).contains('.')) continue // subpackage
            // Not initialised: some generated classes load the native library in <clinit>.
            val cls = Class.forName(className, false, loader)
            if (className.contains('$')) continue // nested: described with its outer class
            if (className.endsWith("Kt")) { // file facade: top-level functions
                for (m in cls.declaredMethods) {
                    val f = m.kotlinFunction ?: continue
                    if (f.visibility == KVisibility.PUBLIC) functions.getOrPut(f.name) { mutableListOf() }.add(signature(f))
                }
                continue
            }
            val k = try { cls.kotlin.also { it.visibility } } catch (e: Throwable) { continue }
            describe(k, k.simpleName ?: continue, pkg, types)
        }
    }
    println("{\"types\":{" + types.joinToString(",") + "},\"functions\":{" +
        functions.entries.joinToString(",") { q(it.key) + ":[" + it.value.joinToString(",") + "]" } + "}}")
}
