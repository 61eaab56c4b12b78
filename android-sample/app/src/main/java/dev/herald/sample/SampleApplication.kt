package dev.herald.sample

import android.app.Application
import android.app.NotificationChannel
import android.app.NotificationManager
import android.net.ConnectivityManager
import android.net.Network
import android.os.Build
import android.os.Handler
import android.os.Looper
import android.util.Log
import androidx.compose.runtime.mutableStateOf
import androidx.lifecycle.DefaultLifecycleObserver
import androidx.lifecycle.LifecycleOwner
import androidx.lifecycle.ProcessLifecycleOwner
import com.google.firebase.messaging.FirebaseMessaging
import dev.herald.sample.core.HeraldController
import dev.herald.sample.core.InboxState
import dev.herald.sample.core.SampleBackendTokenProvider
import dev.herald.sdk.ClientConfig
import dev.herald.sdk.HeraldAndroid
import dev.herald.sdk.HeraldException
import dev.herald.sdk.PushProvider
import java.io.File
import java.util.concurrent.Executors

/**
 * Owns the one HeraldController of the process and feeds it the platform's events:
 * process foreground/background (ProcessLifecycleOwner), the default network
 * (ConnectivityManager) and the FCM token. The UI observes [inbox].
 */
class SampleApplication : Application() {
    val settings by lazy { SampleSettings(this) }

    /** What the screen shows; written on the main thread only. */
    val inbox = mutableStateOf(InboxState())
    val signedInUser = mutableStateOf<String?>(null)

    @Volatile
    var controller: HeraldController? = null
        private set

    private val main = Handler(Looper.getMainLooper())
    private val background = Executors.newSingleThreadExecutor()

    override fun onCreate() {
        super.onCreate()
        // Before any HeraldClient connects: TLS certificates are checked by Android's
        // trust manager, which the SDK reaches through the app's Context.
        HeraldAndroid.init(this)
        createNotificationChannel()
        ProcessLifecycleOwner.get().lifecycle.addObserver(object : DefaultLifecycleObserver {
            override fun onStart(owner: LifecycleOwner) {
                controller?.let {
                    it.foreground()
                    it.start() // the first time after a restart: connect now that there is UI
                }
            }
            override fun onStop(owner: LifecycleOwner) { controller?.background() }
        })
        getSystemService(ConnectivityManager::class.java).registerDefaultNetworkCallback(
            object : ConnectivityManager.NetworkCallback() {
                override fun onAvailable(network: Network) { controller?.networkChanged(true) }
                override fun onLost(network: Network) { controller?.networkChanged(false) }
            },
        )
        // Signed in before: restore, but connect only when the process comes to the
        // foreground (onStart above); FCM may have started this process in the background.
        settings.signIn?.let { restore(it) }
    }

    /** Sign-in (stub): remember who and where, then connect. */
    fun signIn(signIn: SignIn) {
        settings.signIn = signIn
        restore(signIn).start()
    }

    fun signOut() {
        settings.signIn = null
        controller?.let { old ->
            // unregister() is HTTP: off the main thread; close() waits at most 0.5 s.
            background.execute {
                old.signOut()
                old.close()
            }
        }
        controller = null
        signedInUser.value = null
        inbox.value = InboxState()
    }

    /**
     * The controller for a process that FCM started without UI (the app was not running):
     * created from the saved sign-in, not connected. Null when nobody signed in.
     */
    @Synchronized
    fun controllerForPush(): HeraldController? = controller ?: settings.signIn?.let { create(it) }

    @Synchronized
    private fun restore(signIn: SignIn): HeraldController {
        val c = controller ?: create(signIn)
        signedInUser.value = signIn.user
        if (BuildConfig.HAS_FIREBASE) {
            FirebaseMessaging.getInstance().token.addOnSuccessListener { token ->
                background.execute { registerFcmToken(token) }
            }
        }
        return c
    }

    private fun create(signIn: SignIn): HeraldController {
        val config = ClientConfig(
            baseUrl = signIn.gatewayUrl,
            deviceId = settings.deviceId,
            dataDir = File(filesDir, "herald").path,
        )
        val c = HeraldController(config, SampleBackendTokenProvider(signIn.backendUrl, signIn.user)) { state ->
            main.post { inbox.value = state }
        }
        controller = c
        return c
    }

    /** Blocking: from FirebaseMessagingService.onNewToken or the background executor. */
    fun registerFcmToken(token: String) {
        val c: HeraldController = controllerForPush() ?: return // registered at the next sign-in
        try {
            c.registerPushToken(PushProvider.FCM, token)
        } catch (e: HeraldException) {
            Log.w("HeraldSample", "FCM token not registered: ${e.message}")
        }
    }

    private fun createNotificationChannel() {
        if (Build.VERSION.SDK_INT >= Build.VERSION_CODES.O) {
            val channel = NotificationChannel(
                MESSAGES_CHANNEL, getString(R.string.channel_messages), NotificationManager.IMPORTANCE_DEFAULT,
            )
            getSystemService(NotificationManager::class.java).createNotificationChannel(channel)
        }
    }

    companion object {
        const val MESSAGES_CHANNEL = "messages"
    }
}
