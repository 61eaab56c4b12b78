// Plain Kotlin (no Android classes): owns the HeraldClient and turns its callbacks, push
// payloads and lifecycle events into one immutable InboxState for the UI. The Android
// side (SampleApplication, HeraldMessagingService, MainActivity) only forwards platform
// events here and renders `state`. Compiled and tested on the JVM by samples.sh.
package dev.herald.sample.core

import dev.herald.sdk.ApnsEnvironment
import dev.herald.sdk.ClientConfig
import dev.herald.sdk.ConnectionState
import dev.herald.sdk.DeviceRegistration
import dev.herald.sdk.ErrorEvent
import dev.herald.sdk.HeraldClient
import dev.herald.sdk.HeraldException
import dev.herald.sdk.HeraldListener
import dev.herald.sdk.HeraldMessage
import dev.herald.sdk.PushProvider
import dev.herald.sdk.TokenProvider

class HeraldController(
    config: ClientConfig,
    tokenProvider: TokenProvider,
    /**
     * Called after every change with the new state, on the thread that made it (SDK,
     * push or caller thread) and under the controller's lock, so calls arrive in order:
     * hand the state to the UI thread and return.
     */
    private val onChange: (InboxState) -> Unit,
) : AutoCloseable {
    private val lock = Any()
    private val inbox = Inbox()

    @Volatile
    var state: InboxState = InboxState()
        private set

    private val listener = object : HeraldListener {
        override fun onStateChanged(state: ConnectionState) {
            update { it.copy(badge = badgeOf(state)) }
        }

        override fun onMessage(message: HeraldMessage) {
            // The SDK acks after this returns: keep it quick (no I/O here).
            addMessages(listOf(message.toReceived(Route.LIVE)))
        }

        override fun onError(event: ErrorEvent) {
            val what = event.error.message ?: event.error.toString()
            update { it.copy(lastError = if (event.terminal) "$what (stopped; sign in again)" else what) }
        }

        override fun onSubscriptionChanged(topic: String, subscribed: Boolean) {}

        override fun onSubscriptionFailed(topic: String, subscribe: Boolean, code: String, message: String) {
            update { it.copy(lastError = "topic $topic refused: $code") }
        }
    }

    private val heraldClient: HeraldClient = HeraldClient(config, listener, tokenProvider)

    /** Connect and stay connected (the SDK reconnects with backoff). */
    fun start() = heraldClient.connect()

    /** ConnectivityManager / NWPathMonitor: the default network appeared or went away. */
    fun networkChanged(available: Boolean) = heraldClient.networkChanged(available)

    /** ProcessLifecycleOwner ON_START / scenePhase .active. */
    fun foreground() = heraldClient.appForeground()

    /** ProcessLifecycleOwner ON_STOP / scenePhase .background: the SDK suspends the socket. */
    fun background() = heraldClient.appBackground()

    /** Pull to refresh: fetch anything pending over HTTP (arrives through the listener). */
    fun refresh() = heraldClient.syncNow()

    /**
     * Registers an FCM token (or an APNs token, hex) with the gateway. Blocking (HTTP):
     * call from a background thread, e.g. FirebaseMessagingService.onNewToken.
     */
    fun registerPushToken(provider: PushProvider, token: String, environment: ApnsEnvironment? = null): DeviceRegistration {
        try {
            val registration = heraldClient.registerPushToken(provider, token, environment)
            update { it.copy(pushRegistration = "${provider.name.lowercase()} token ${registration.pushTokenState}") }
            return registration
        } catch (e: HeraldException) {
            update { it.copy(lastError = "push token registration failed: ${e.message}") }
            throw e
        }
    }

    /**
     * A push payload (FCM `RemoteMessage.data`, or an APNs userInfo as a string map).
     * Returns the messages it brought that the app had not seen (to show as
     * notifications), already added to the list; empty for a duplicate or a push that is
     * not Herald's. Blocking (may fetch the body): call from a background thread.
     */
    fun handlePush(data: Map<String, String>): List<ReceivedMessage> {
        val fetched = try {
            // Recorded and acked (or given up, within the SDK's deadline) on return.
            heraldClient.handlePush(jsonObjectOf(data)).messages
        } catch (e: HeraldException.NotHeraldPush) {
            return emptyList()
        }
        return addMessages(fetched.map { it.toReceived(Route.PUSH) })
    }

    fun connectionState(): ConnectionState = heraldClient.state()

    /**
     * Logout: the gateway forgets the push token (no more pushes for this user) and the
     * SDK its local state (cursor, topics). Blocking (HTTP): call from a background
     * thread, then [close].
     */
    fun signOut() {
        try {
            heraldClient.unregister()
        } catch (e: HeraldException) {
            update { it.copy(lastError = "push token not removed: ${e.message}") }
        }
        heraldClient.reset()
    }

    /** Disconnects, stops the SDK threads and frees the native client. */
    override fun close() {
        heraldClient.shutdown()
        heraldClient.close()
    }

    private fun addMessages(messages: List<ReceivedMessage>): List<ReceivedMessage> {
        var added: List<ReceivedMessage> = emptyList()
        update {
            added = inbox.add(messages)
            if (added.isEmpty()) it else it.copy(messages = inbox.newestFirst())
        }
        return added
    }

    private fun update(change: (InboxState) -> InboxState) {
        synchronized(lock) {
            val next = change(state)
            if (next == state) return
            state = next
            onChange(next)
        }
    }
}
