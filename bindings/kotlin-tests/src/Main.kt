// Kotlin tests of the generated binding against a real gateway (started by run.sh).
// A plain `main`: runs every check, prints "N passed, M failed", exits non-zero on
// any failure (helpers in TestKit.kt). Environment: HERALD_URL, HERALD_API_KEY,
// HERALD_TEST_DIR.

import dev.herald.sdk.*
import java.io.File
import java.io.FileOutputStream
import java.util.concurrent.CopyOnWriteArrayList
import java.util.concurrent.TimeUnit
import java.util.concurrent.atomic.AtomicInteger

val baseUrl: String = System.getenv("HERALD_URL") ?: error("HERALD_URL not set")
val apiKey: String = System.getenv("HERALD_API_KEY") ?: error("HERALD_API_KEY not set")
val testDir: File = File(System.getenv("HERALD_TEST_DIR") ?: error("HERALD_TEST_DIR not set"))

fun http(method: String, path: String, body: String?, bearer: String): Pair<Int, String> =
    httpRequest(method, baseUrl + path, body, bearer)

fun jsonField(json: String, name: String): String =
    Regex("\"$name\"\\s*:\\s*\"([^\"]*)\"").find(json)?.groupValues?.get(1)
        ?: throw CheckFailed("no $name in $json")

/** Publishes `{"n": n}` to a device; returns the message id. */
fun publish(device: String, n: Int, extra: String = ""): String {
    val (code, body) = http(
        "POST", "/v1/messages",
        """{"to":{"device":"$device"},"data":{"n":$n},"push":"never"$extra}""", apiKey,
    )
    check(code == 202) { "publish answered $code: $body" }
    return jsonField(body, "message_id")
}

/**
 * A token of `user`; bound to `device` (its `did`) when given, as device routes require,
 * and allowed to subscribe to every topic (the gateway's `auth.topic_policy = "claims"`).
 */
fun mintToken(user: String, ttlSeconds: Int, device: String? = null): String {
    val did = if (device != null) ""","device_id":"$device","topics":["*"]""" else ""
    val (code, body) = http("POST", "/v1/tokens", """{"user":"$user","ttl_seconds":$ttlSeconds$did}""", apiKey)
    check(code == 200 || code == 201) { "token mint answered $code: $body" }
    return jsonField(body, "token")
}

class Recorder : HeraldListener {
    val states = CopyOnWriteArrayList<ConnectionState>()
    val messages = CopyOnWriteArrayList<HeraldMessage>()
    val errors = CopyOnWriteArrayList<ErrorEvent>()
    // Callbacks come from one SDK thread, one at a time (JNA may give the attached
    // native thread a new Java name per call, so count overlaps instead of names).
    val inside = AtomicInteger(0)
    val overlaps = AtomicInteger(0)

    private fun enter() {
        if (inside.incrementAndGet() != 1) overlaps.incrementAndGet()
        Thread.sleep(1)
    }
    private fun leave() { inside.decrementAndGet() }

    override fun onStateChanged(state: ConnectionState) {
        enter(); states.add(state); leave()
    }
    override fun onMessage(message: HeraldMessage) {
        enter(); messages.add(message); leave()
    }
    override fun onError(event: ErrorEvent) {
        errors.add(event)
    }
    val topics = CopyOnWriteArrayList<String>()
    override fun onSubscriptionChanged(topic: String, subscribed: Boolean) {
        topics.add(if (subscribed) "+$topic" else "-$topic")
    }
    override fun onSubscriptionFailed(topic: String, subscribe: Boolean, code: String, message: String) {
        topics.add("!$topic:$code")
    }

    fun last(): ConnectionState? = states.lastOrNull()
    fun ns(): List<Int> = messages.map { Regex("\"n\":(\\d+)").find(it.dataJson)!!.groupValues[1].toInt() }
}

/** Mints tokens of `user` bound to the device id the SDK asks for (configured or generated). */
class Tokens(val user: String, val ttlSeconds: Int = 3600) : TokenProvider {
    val calls = AtomicInteger(0)
    val devices = CopyOnWriteArrayList<String>()
    override fun fetchToken(deviceId: String): String {
        calls.incrementAndGet()
        devices.add(deviceId)
        return mintToken(user, ttlSeconds, deviceId)
    }
}

fun deliveryState(messageId: String): String {
    val (code, body) = http("GET", "/v1/messages/$messageId", null, apiKey)
    check(code == 200) { "message status answered $code: $body" }
    return jsonField(body, "state")
}

fun deviceField(device: String, name: String): String {
    val (code, body) = http("GET", "/v1/devices/$device", null, apiKey)
    check(code == 200) { "device answered $code: $body" }
    return jsonField(body, name)
}

/**
 * The child JVM of the kill test: a minimal app that connects and, in onMessage,
 * appends the message id to [out] (a write(2) per line: it survives SIGKILL) and
 * exits once [want] distinct messages were written over all runs. With [stallAt] > 0
 * it stops inside its stallAt-th onMessage of this run, to be killed right there.
 */
fun replayChild(device: String, dir: String, out: File, want: Int, stallAt: Int) {
    val seen = HashSet(if (out.exists()) out.readLines().filter { it.isNotEmpty() } else listOf())
    val stream = FileOutputStream(out, true)
    val done = java.util.concurrent.CountDownLatch(1)
    var handled = 0
    val listener = object : HeraldListener {
        override fun onStateChanged(state: ConnectionState) {}
        override fun onMessage(message: HeraldMessage) {
            stream.write((message.id + "\n").toByteArray())
            seen.add(message.id)
            handled++
            if (handled == stallAt) Thread.sleep(600_000)
            if (seen.size >= want) done.countDown()
        }
        override fun onError(event: ErrorEvent) {}
        override fun onSubscriptionChanged(topic: String, subscribed: Boolean) {}
        override fun onSubscriptionFailed(topic: String, subscribe: Boolean, code: String, message: String) {}
    }
    val client = HeraldClient(config(device, dir), listener, Tokens("killer"))
    client.connect()
    done.await(120, TimeUnit.SECONDS)
    client.shutdown()
    kotlin.system.exitProcess(0)
}

fun startReplayChild(device: String, out: File, want: Int, stallAt: Int): Process {
    val java = ProcessHandle.current().info().command().orElse("java")
    return ProcessBuilder(
        java, "-Djna.library.path=" + System.getProperty("jna.library.path"),
        "-cp", System.getProperty("java.class.path"),
        "MainKt", "replay-child", device, device, out.path, want.toString(), stallAt.toString(),
    ).inheritIO().start()
}

fun config(device: String?, dir: String = device ?: "generated") = ClientConfig(
    baseUrl = baseUrl,
    deviceId = device,
    dataDir = File(testDir, dir).path,
    backoffMinMs = 50uL,
    backoffMaxMs = 500uL,
)

fun main(args: Array<String>) {
    if (args.isNotEmpty() && args[0] == "replay-child") {
        replayChild(args[1], args[2], File(args[3]), args[4].toInt(), args[5].toInt())
    }

    test("typed error on a bad URL") {
        try {
            HeraldClient(config("bad").copy(baseUrl = "not a url"), Recorder(), Tokens("u"))
            throw CheckFailed("no exception")
        } catch (e: HeraldException.InvalidConfig) {
            check(e.detail.contains("base_url")) { e.detail }
        }
        // A certificate pin that is not a base64 SHA-256 (TLS and pinning are tested
        // in sdk/tests/tls.rs).
        try {
            HeraldClient(config("bad-pin").copy(pinnedSpkiSha256 = listOf("abc")), Recorder(), Tokens("u"))
            throw CheckFailed("no exception")
        } catch (e: HeraldException.InvalidConfig) {
            check(e.detail.contains("pinned_spki_sha256")) { e.detail }
        }
    }

    test("isHeraldPush and jwtExpiry") {
        check(isHeraldPush("""{"herald_id":"m","herald_seq":"1"}""")) { "herald push" }
        check(!isHeraldPush("""{"from":"someone else"}""")) { "foreign push" }
        val token = mintToken("alice", 600)
        val exp = jwtExpiry(token)!!.toLong()
        val now = System.currentTimeMillis() / 1000
        check(exp in (now + 500)..(now + 700)) { "exp $exp now $now" }
    }

    test("connect, states, live message, backlog, de-dup across reconnect and restart") {
        val rec = Recorder()
        val tokens = Tokens("alice")
        var client = HeraldClient(config("kt-1"), rec, tokens)
        client.connect()
        waitFor("Connected") { rec.last() is ConnectionState.Connected }
        check(rec.states.first() == ConnectionState.Connecting) { "states ${rec.states}" }
        check(client.state() is ConnectionState.Connected) { "state() ${client.state()}" }
        check((client.state() as ConnectionState.Connected).transport == Transport.WEB_SOCKET) { "transport ${client.state()}" }
        // Live.
        publish("kt-1", 1)
        waitFor("live message") { rec.messages.size == 1 }
        check(rec.messages[0].seq == 1L) { "seq ${rec.messages[0].seq}" }
        check(rec.overlaps.get() == 0) { "callbacks overlapped" }
        // Offline publish, then backlog on reconnect.
        client.disconnect()
        waitFor("Disconnected") { rec.last() == ConnectionState.Disconnected }
        publish("kt-1", 2); publish("kt-1", 3); publish("kt-1", 4)
        client.connect()
        waitFor("backlog") { rec.messages.size >= 4 }
        Thread.sleep(300)
        check(rec.ns() == listOf(1, 2, 3, 4)) { "got ${rec.ns()}" }
        // App restart: a new client on the same data dir repeats nothing.
        client.shutdown()
        check(rec.last() == ConnectionState.Closed) { "last state ${rec.last()}" }
        val rec2 = Recorder()
        client = HeraldClient(config("kt-1"), rec2, tokens)
        client.connect()
        waitFor("Connected again") { rec2.last() is ConnectionState.Connected }
        publish("kt-1", 5)
        waitFor("message 5") { rec2.messages.isNotEmpty() }
        Thread.sleep(300)
        check(rec2.ns() == listOf(5)) { "after restart got ${rec2.ns()}" }
        client.shutdown()
    }

    test("token provider called again when the token expires") {
        val rec = Recorder()
        // 2 s tokens: always within the SDK's 30 s expiry margin, so every new
        // connection needs a fresh one.
        val tokens = Tokens("alice", ttlSeconds = 2)
        val client = HeraldClient(config("kt-exp"), rec, tokens)
        client.connect()
        waitFor("Connected") { rec.last() is ConnectionState.Connected }
        check(tokens.calls.get() == 1) { "calls ${tokens.calls.get()}" }
        client.disconnect()
        waitFor("Disconnected") { rec.last() == ConnectionState.Disconnected }
        client.connect()
        waitFor("Connected with a new token") { rec.last() is ConnectionState.Connected && tokens.calls.get() == 2 }
        client.shutdown()
    }

    test("register push token and handle an FCM data payload") {
        val rec = Recorder()
        val client = HeraldClient(config("kt-push"), rec, Tokens("alice"))
        val reg = client.registerPushToken(PushProvider.FCM, "fcm-token-kotlin", null)
        check(reg.deviceId == "kt-push" && reg.user == "alice") { "$reg" }
        check(reg.pushTokenState == "active") { "$reg" }
        val id = publish("kt-push", 42)
        // What the gateway puts in FCM `data` for a content-free sync hint.
        val payload = """{"herald_id":"$id","herald_seq":"1","herald_device":"kt-push","herald_hint":"1"}"""
        val got = client.handlePush(payload).messages
        check(got.size == 1 && got[0].id == id && got[0].dataJson.contains("42")) { "got $got" }
        check(client.handlePush(payload).messages.isEmpty()) { "duplicate push delivered again" }
        try {
            client.handlePush("""{"from":"another sdk"}""")
            throw CheckFailed("no exception")
        } catch (e: HeraldException.NotHeraldPush) {
        }
        // Connecting afterwards does not deliver it again.
        client.connect()
        waitFor("Connected") { rec.last() is ConnectionState.Connected }
        publish("kt-push", 43)
        waitFor("live message") { rec.messages.isNotEmpty() }
        Thread.sleep(300)
        check(rec.ns() == listOf(43)) { "listener got ${rec.ns()}" }
        client.shutdown()
    }

    test("device of another user: terminal Forbidden, no retries") {
        val owner = Recorder()
        val a = HeraldClient(config("kt-owned", "kt-owned-a"), owner, Tokens("alice"))
        a.connect()
        waitFor("owner connected") { owner.last() is ConnectionState.Connected }
        a.shutdown()
        val rec = Recorder()
        val tokens = Tokens("mallory")
        val b = HeraldClient(config("kt-owned", "kt-owned-b"), rec, tokens)
        b.connect()
        waitFor("terminal error") { rec.errors.isNotEmpty() }
        Thread.sleep(1000)
        val e = rec.errors.single()
        check(e.terminal && e.error is HeraldException.Forbidden) { "$e" }
        check(rec.last() == ConnectionState.Disconnected) { "${rec.states}" }
        check(rec.states.count { it == ConnectionState.Connecting } == 1) { "retried: ${rec.states}" }
        b.shutdown()
    }

    test("token provider failure is a typed terminal error") {
        val rec = Recorder()
        val failing = object : TokenProvider {
            override fun fetchToken(deviceId: String): String = throw HeraldException.TokenProvider("backend unreachable")
        }
        val client = HeraldClient(config("kt-notoken"), rec, failing)
        client.connect()
        waitFor("terminal error", 20_000) { rec.errors.any { it.terminal } }
        val e = rec.errors.last()
        check(e.error is HeraldException.TokenProvider) { "$e" }
        client.shutdown()
    }

    test("kill -9 during a 1000-message replay repeats at most the message being handled") {
        val device = "kt-kill"
        // Claim the device, then queue the backlog while it is offline.
        val claim = HeraldClient(config(device), Recorder(), Tokens("killer"))
        claim.registerPushToken(PushProvider.FCM, "kill-token", null)
        claim.shutdown()
        val total = 1000
        for (n in 1..total) publish(device, n)
        val out = File(testDir, "kill-ids.txt")
        // Killed twice at full speed (wherever it is), once inside an onMessage.
        val kills = listOf(100 to false, 150 to false, 200 to true)
        for ((count, stall) in kills) {
            val before = if (out.exists()) out.readLines().size else 0
            val child = startReplayChild(device, out, total, if (stall) count else 0)
            waitFor("${before + count} lines", 60_000) { out.exists() && out.readLines().size >= before + count }
            child.destroyForcibly() // SIGKILL: no shutdown, no finalizers
            check(child.waitFor(10, TimeUnit.SECONDS)) { "child did not die" }
            check(out.readLines().toSet().size < total) { "the replay was over before the kill" }
        }
        val last = startReplayChild(device, out, total, 0)
        check(last.waitFor(120, TimeUnit.SECONDS) && last.exitValue() == 0) { "last run did not finish" }
        val ids = out.readLines().filter { it.isNotEmpty() }
        val repeats = ids.size - ids.toSet().size
        println("     kill test: ${ids.size} deliveries of ${ids.toSet().size} messages, $repeats repeated over ${kills.size} kills")
        check(ids.toSet().size == total) { "lost: ${total - ids.toSet().size}" }
        check(repeats <= kills.size) { "$repeats repeats over ${kills.size} kills" }
        // A repeat is only ever the message right before the restart point.
        for (i in 1 until ids.size) {
            if (ids.subList(0, i).contains(ids[i])) check(ids[i] == ids[i - 1]) { "repeat of an older message ${ids[i]} at $i" }
        }
    }

    test("two clients on one data dir (app + extension) hand each message out once") {
        val device = "kt-shared"
        val app = Recorder()
        val appClient = HeraldClient(config(device, "kt-shared-dir"), app, Tokens("alice"))
        val ext = HeraldClient(config(device, "kt-shared-dir"), Recorder(), Tokens("alice"))
        appClient.connect()
        waitFor("app connected") { app.last() is ConnectionState.Connected }
        // Both see every message at once: live on the app, a push in the extension.
        val fromPush = CopyOnWriteArrayList<String>()
        val ids = ArrayList<String>()
        for (n in 1..30) {
            val id = publish(device, n)
            ids.add(id)
            val payload = """{"herald_id":"$id","herald_seq":"$n","herald_device":"$device","herald_hint":"1"}"""
            fromPush.addAll(ext.handlePush(payload).messages.map { it.id })
        }
        waitFor("all 30 handled once") { app.messages.size + fromPush.size >= 30 }
        Thread.sleep(500)
        val all = app.messages.map { it.id } + fromPush
        check(all.size == 30 && all.toSet() == ids.toSet()) {
            "app ${app.messages.size} + push ${fromPush.size}; repeated: ${all.groupBy { it }.filter { it.value.size > 1 }.keys}"
        }
        // The extension handled some while the app was offline: the app, reconnecting
        // with its stale cursor, does not show them again.
        appClient.disconnect()
        waitFor("app offline") { app.last() == ConnectionState.Disconnected }
        val before = app.messages.size
        for (n in 31..35) publish(device, n)
        val id36 = publish(device, 36)
        val got = ext.handlePush("""{"herald_id":"$id36","herald_seq":"36","herald_device":"$device","herald_hint":"1"}""")
        check(got.messages.size == 6 && got.acked) { "extension got ${got.messages.size}, acked ${got.acked}" }
        appClient.connect()
        waitFor("app connected again") { app.last() is ConnectionState.Connected }
        publish(device, 37)
        waitFor("message 37") { app.ns().contains(37) }
        Thread.sleep(300)
        check(app.messages.size == before + 1) { "app got again: ${app.ns().drop(before)}" }
        appClient.shutdown()
        ext.shutdown()
    }

    test("handlePush records and acks before it returns; shutdown right after keeps the ack") {
        val device = "kt-ext"
        val rec = Recorder()
        val client = HeraldClient(config(device), rec, Tokens("alice"))
        client.registerPushToken(PushProvider.FCM, "ext-token", null)
        val (code, body) = http(
            "POST", "/v1/messages",
            """{"to":{"device":"$device"},"data":{"n":1},"push_content":"hint"}""", apiKey,
        )
        check(code == 202) { body }
        val id = jsonField(body, "message_id")
        waitFor("pushed") { deliveryState(id) == "pushed" }
        val got = client.handlePush("""{"herald_id":"$id","herald_seq":"1","herald_device":"$device","herald_hint":"1"}""")
        val started = System.nanoTime()
        client.shutdown()
        val shutdownMs = (System.nanoTime() - started) / 1_000_000
        check(got.messages.map { it.id } == listOf(id) && got.acked) { "$got" }
        check(deliveryState(id) == "acked") { "state ${deliveryState(id)}" }
        check(shutdownMs < 1000) { "shutdown took $shutdownMs ms" }
    }

    test("handlePush returns by its deadline when the gateway does not answer") {
        // A listening socket that never answers (a blackholed gateway).
        val silent = java.net.ServerSocket(0, 50, java.net.InetAddress.getLoopbackAddress())
        val accepted = CopyOnWriteArrayList<java.net.Socket>()
        Thread { try { while (true) accepted.add(silent.accept()) } catch (e: Exception) {} }.apply { isDaemon = true }.start()
        val cfg = config("kt-blackhole").copy(baseUrl = "http://127.0.0.1:${silent.localPort}", requestTimeoutMs = 60_000uL)
        val client = HeraldClient(cfg, Recorder(), object : TokenProvider {
            override fun fetchToken(deviceId: String): String = mintToken("alice", 600, deviceId)
        })
        val started = System.nanoTime()
        try {
            client.handlePushWithin("""{"herald_id":"m","herald_seq":"3","herald_hint":"1"}""", 1500uL)
            throw CheckFailed("no exception")
        } catch (e: HeraldException.Timeout) {
        }
        val ms = (System.nanoTime() - started) / 1_000_000
        check(ms in 1000..3000) { "returned after $ms ms" }
        client.shutdown()
        silent.close()
    }

    test("shutdown does not block while the listener is busy") {
        val device = "kt-busy"
        val entered = java.util.concurrent.CountDownLatch(1)
        val connected = java.util.concurrent.CountDownLatch(1)
        val slow = object : HeraldListener {
            override fun onStateChanged(state: ConnectionState) {
                if (state is ConnectionState.Connected) connected.countDown()
            }
            override fun onMessage(message: HeraldMessage) { entered.countDown(); Thread.sleep(3000) }
            override fun onError(event: ErrorEvent) {}
            override fun onSubscriptionChanged(topic: String, subscribed: Boolean) {}
            override fun onSubscriptionFailed(topic: String, subscribe: Boolean, code: String, message: String) {}
        }
        val client = HeraldClient(config(device), slow, Tokens("alice"))
        client.connect()
        // The device exists once connected (a publish to it before is 404).
        check(connected.await(15, TimeUnit.SECONDS)) { "not connected" }
        publish(device, 1)
        check(entered.await(15, TimeUnit.SECONDS)) { "no message" }
        val started = System.nanoTime()
        client.shutdown()
        val ms = (System.nanoTime() - started) / 1_000_000
        check(ms < 1000) { "shutdown blocked $ms ms" }
    }

    test("unregister removes the push token; reset forgets the generated device id") {
        val rec = Recorder()
        val tokens = Tokens("alice")
        val client = HeraldClient(config(null, "kt-gen"), rec, tokens)
        val id = client.deviceId()
        check(Regex("[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}").matches(id)) { id }
        client.registerPushToken(PushProvider.FCM, "logout-token", null)
        check(deviceField(id, "push_token") == "active") { "not registered" }
        // The provider was asked for a token of the generated id (the gateway needs it as `did`).
        check(tokens.devices.isNotEmpty() && tokens.devices.all { it == id }) { "asked for ${tokens.devices}" }
        client.shutdown()
        // Same data dir: same generated id.
        val again = HeraldClient(config(null, "kt-gen"), rec, Tokens("alice"))
        check(again.deviceId() == id) { "${again.deviceId()} != $id" }
        again.unregister()
        check(deviceField(id, "push_token") == "none") { "token still there" }
        again.unregister() // idempotent
        again.reset()
        again.shutdown()
        val next = HeraldClient(config(null, "kt-gen"), rec, Tokens("bob"))
        check(next.deviceId() != id) { "device id survived reset" }
        next.shutdown()
    }

    test("topics survive a restart, offline unsubscribe included; logger and stats") {
        val lines = CopyOnWriteArrayList<String>()
        setLogger(object : HeraldLogger {
            override fun log(level: LogLevel, message: String) { lines.add("$level $message") }
        }, LogLevel.DEBUG)
        val device = "kt-topics"
        val rec = Recorder()
        var client = HeraldClient(config(device), rec, Tokens("alice"))
        client.subscribe("kt-news") // offline: saved
        client.shutdown()
        client = HeraldClient(config(device), rec, Tokens("alice"))
        client.connect()
        waitFor("subscribed after restart") { rec.topics.contains("+kt-news") }
        val (code, body) = http("POST", "/v1/messages", """{"to":{"topic":"kt-news"},"data":{"n":1}}""", apiKey)
        check(code == 202) { body }
        waitFor("topic message") { rec.messages.isNotEmpty() }
        client.disconnect()
        waitFor("offline") { rec.last() == ConnectionState.Disconnected }
        client.unsubscribe("kt-news") // offline, then the app dies
        client.shutdown()
        client = HeraldClient(config(device), rec, Tokens("alice"))
        client.connect()
        waitFor("unsubscribed after restart") { rec.topics.contains("-kt-news") }
        http("POST", "/v1/messages", """{"to":{"topic":"kt-news"},"data":{"n":2}}""", apiKey)
        publish(device, 3)
        waitFor("direct message") { rec.ns().contains(3) }
        check(!rec.ns().contains(2)) { "still subscribed: ${rec.ns()}" }
        val stats = client.stats()
        check(stats.connections == 1uL && stats.messagesDelivered == 1uL) { "$stats" }
        client.shutdown()
        // A refused connection is logged at DEBUG (a healthy run may log nothing), on
        // the logger's own thread: wait for it.
        val closed = java.net.ServerSocket(0, 1, java.net.InetAddress.getLoopbackAddress())
        val port = closed.localPort
        closed.close()
        val offline = HeraldClient(config("kt-log").copy(baseUrl = "http://127.0.0.1:$port"), Recorder(), Tokens("alice"))
        offline.connect()
        waitFor("a DEBUG log line") { lines.any { it.startsWith("DEBUG") } }
        offline.shutdown()
        setLogger(null, LogLevel.ERROR)
    }

    finish()
}
