package dev.herald.sample

import android.Manifest
import android.content.pm.PackageManager
import android.os.Build
import android.util.Log
import androidx.core.app.NotificationCompat
import androidx.core.app.NotificationManagerCompat
import androidx.core.content.ContextCompat
import androidx.lifecycle.Lifecycle
import androidx.lifecycle.ProcessLifecycleOwner
import com.google.firebase.messaging.FirebaseMessagingService
import com.google.firebase.messaging.RemoteMessage
import dev.herald.sample.core.HeraldController
import dev.herald.sdk.HeraldException

/**
 * FCM entry points. Both run on a background thread FCM provides, so the blocking SDK
 * calls (registerPushToken, handlePush) are made right here.
 */
class HeraldMessagingService : FirebaseMessagingService() {
    private val app get() = application as SampleApplication

    override fun onNewToken(token: String) {
        app.registerFcmToken(token)
    }

    override fun onMessageReceived(remoteMessage: RemoteMessage) {
        val controller: HeraldController = app.controllerForPush() ?: return
        // The messages this push brought that the app had not seen yet (fetched from the
        // gateway for a sync hint); already in the list. A foreign push gives none.
        val fresh = try {
            controller.handlePush(remoteMessage.data)
        } catch (e: HeraldException) {
            // The gateway was unreachable and the push had no content of its own; the
            // message is fetched on the next connect or sync.
            Log.w("HeraldSample", "push not handled: ${e.message}")
            return
        }
        val inForeground = ProcessLifecycleOwner.get().lifecycle.currentState.isAtLeast(Lifecycle.State.STARTED)
        if (inForeground || !mayNotify()) return
        for (message in fresh) {
            val notification = NotificationCompat.Builder(this, SampleApplication.MESSAGES_CHANNEL)
                .setSmallIcon(android.R.drawable.stat_notify_chat)
                .setContentTitle(message.title)
                .setContentText(message.body)
                .setAutoCancel(true)
                .build()
            NotificationManagerCompat.from(this).notify(message.id.hashCode(), notification)
        }
    }

    private fun mayNotify(): Boolean = Build.VERSION.SDK_INT < Build.VERSION_CODES.TIRAMISU ||
        ContextCompat.checkSelfPermission(this, Manifest.permission.POST_NOTIFICATIONS) == PackageManager.PERMISSION_GRANTED
}
